"""Stage two's final step: a per-label blend of its members (LightGBM, the sequence model), honestly scored.

The blend is p = sum_m w_m p_m per label, with w on a grid of the simplex
(steps of 1/GRID), chosen by the label's log loss on the members' honest OOF
probabilities. Blending probabilities, not logits: it is what log loss
rewards (a mean of calibrated probabilities stays calibrated), and a weight
of 0 or 1 is the "better member per label" choice, which the grid includes.

Shrinkage towards the reference member (LightGBM). A grid fitted on a few
hundred positive rows finds a weight that looks better on those rows
whether or not it is (measured on a held-out generated set: the
epidural weight went wholly to the sequence member and the blend lost to
LightGBM alone on test). So a label keeps other members' weight only where
the chosen blend beats the reference alone by more than the fold-to-fold
spread of that gain: mean over folds of (reference loss - blend loss) >
their standard deviation. Otherwise the reference takes the whole label.

Honest to the second order (`cross_fit`). The blend's own OOF score is
cross-fitted: fold k's rows are blended with weights chosen on the other
folds only. The member predictions those weights are fitted on must not
have been shaped by fold k either: each member's rounds or epochs for them
were picked with fold k left out as well (the members' `nested[k]`,
stacking.model.pick_pairs), so nothing of fold k's labels reaches fold k's
weights. The weights applied to the test set (and saved with stage two) are
fitted on all folds' honest OOF predictions, with the same shrinkage.
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


def clear_gain(y: np.ndarray, blended: np.ndarray, reference: np.ndarray, folds: np.ndarray) -> bool:
    """Whether a blend (n,) beats the reference (n,) on one label by more than the gain's fold-to-fold
    spread: mean over folds of the per-fold log-loss gain > its standard deviation (ddof 1)."""
    gains = []
    for f in np.unique(folds):
        rows = folds == f
        pair = np.stack([reference[rows], blended[rows]], axis=1)
        ref, mix = _label_loss(pair, y[rows])
        gains.append(ref - mix)
    gains = np.asarray(gains)
    return len(gains) > 1 and gains.mean() > gains.std(ddof=1)


def fit_weights(y: np.ndarray, preds: dict[str, np.ndarray], folds: np.ndarray | None = None,
                reference: str | None = None) -> np.ndarray:
    """(n_members, 6) weights, members in `preds` order, chosen per label on these rows.

    With `folds` (the rows' folds) and `reference` (a member's name), a label
    whose best blend does not beat the reference alone clearly
    (`clear_gain`) gets the reference alone (module docstring).
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
        if folds is not None and reference in preds and weights[names.index(reference), j] < 1:
            r = names.index(reference)
            if not clear_gain(y[:, j], stacked[:, j, :] @ weights[:, j], stacked[:, j, r], folds):
                weights[:, j] = np.eye(len(names))[r]
    return weights


def apply(weights: np.ndarray, preds: dict[str, np.ndarray]) -> np.ndarray:
    """Blend (n, 6) of the members' probabilities with (n_members, 6) weights (members in preds order)."""
    return sum(weights[i] * np.asarray(p, dtype=np.float64) for i, p in enumerate(preds.values()))


def cross_fit(y: np.ndarray, folds: np.ndarray, preds: dict[str, np.ndarray], nested: dict | None = None,
              reference: str | None = None) -> tuple[np.ndarray, dict]:
    """Honest OOF blend: fold k's rows blended with weights fitted on the other folds.

    preds: member -> honest OOF (n, 6). nested: member -> (K, n, 6), [i] the
    member's predictions of the folds != the i-th fold at rounds or epochs
    picked without it (module docstring); without it the weights are fitted
    on `preds` (honest to the first order only). reference: the member to
    shrink towards (`fit_weights`).
    Returns (blended OOF (n, 6), {k: weights used for fold k}).
    """
    out = np.empty(y.shape)
    used = {}
    for i, k in enumerate(np.unique(folds)):
        rows = folds == k
        fit_on = {m: (nested[m][i] if nested is not None else p)[~rows] for m, p in preds.items()}
        used[int(k)] = fit_weights(y[~rows], fit_on, folds[~rows], reference)
        out[rows] = apply(used[int(k)], {m: p[rows] for m, p in preds.items()})
    return out, used
