"""Stage two's final step: a per-label blend of its members (LightGBM, the sequence model), honestly scored.

The blend is p = sum_m w_m p_m per label, with w on a grid of the simplex
(steps of 1/GRID), chosen by the label's log loss on the members' honest OOF
probabilities. Those weights are themselves fitted on OOF labels, so the
blend's own OOF score is cross-fitted: the rows of fold k are blended with
weights chosen on the folds != k (`cross_fit`), never on fold k, which is
the score the metrics table shows. The weights applied to the test set (and
saved with stage two) are those chosen on all folds.

Blending probabilities, not logits: it is what log loss rewards (a mean of
calibrated probabilities stays calibrated), and a weight of 0 or 1 is the
"better member per label" choice, which the grid includes.
"""
from __future__ import annotations

import itertools

import numpy as np

GRID = 20  # weights in steps of 0.05


def _label_loss(p: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Binary log loss of each candidate column: p (n, c), y (n,) -> (c,)."""
    p = np.clip(p, 1e-15, 1 - 1e-15)
    return -(y[:, None] * np.log(p) + (1 - y[:, None]) * np.log(1 - p)).mean(axis=0)


def simplex(n_members: int, steps: int = GRID) -> np.ndarray:
    """Every weight vector with entries in {0, 1/steps, ..., 1} summing to 1: (n_candidates, n_members)."""
    rows = [c for c in itertools.product(range(steps + 1), repeat=n_members) if sum(c) == steps]
    return np.asarray(rows, dtype=np.float64) / steps


def fit_weights(y: np.ndarray, preds: dict[str, np.ndarray]) -> np.ndarray:
    """(n_members, 6) weights, members in `preds` order, chosen per label on these rows.

    Ties (e.g. identical members) go to the first candidate in grid order,
    which puts the weight on the last-listed member first; no matter.
    """
    names = list(preds)
    cand = simplex(len(names))
    stacked = np.stack([preds[m] for m in names], axis=-1)  # (n, 6, M)
    weights = np.empty((len(names), y.shape[1]))
    for j in range(y.shape[1]):
        blended = stacked[:, j, :] @ cand.T  # (n, candidates)
        weights[:, j] = cand[int(np.argmin(_label_loss(blended, y[:, j])))]
    return weights


def apply(weights: np.ndarray, preds: dict[str, np.ndarray]) -> np.ndarray:
    """Blend (n, 6) of the members' probabilities with (n_members, 6) weights (members in preds order)."""
    return sum(weights[i] * np.asarray(p, dtype=np.float64) for i, p in enumerate(preds.values()))


def cross_fit(y: np.ndarray, folds: np.ndarray, preds: dict[str, np.ndarray]) -> tuple[np.ndarray, dict]:
    """Honest OOF blend: fold k's rows blended with weights fitted on the other folds.

    Returns (blended OOF (n, 6), {k: weights used for fold k}).
    """
    out = np.empty(y.shape)
    used = {}
    for k in np.unique(folds):
        rows = folds == k
        used[int(k)] = fit_weights(y[~rows], {m: p[~rows] for m, p in preds.items()})
        out[rows] = apply(used[int(k)], {m: p[rows] for m, p in preds.items()})
    return out, used
