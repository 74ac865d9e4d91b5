"""The competition metric: weighted multi-label log loss.

Weight 2 on `any`, 1 on each subtype; probabilities clipped to
[1e-15, 1 - 1e-15]; mean over all (image, label) pairs weighted by the label
weight, which equals the weighted mean of the six per-label log losses.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from .labels import LABELS

WEIGHTS = np.array([1.0, 1.0, 1.0, 1.0, 1.0, 2.0])
EPS = 1e-15


def _check(y_true, y_pred) -> tuple[np.ndarray, np.ndarray]:
    y_true = np.asarray(y_true, dtype=np.float64)
    y_pred = np.asarray(y_pred, dtype=np.float64)
    if y_true.shape != y_pred.shape or y_true.ndim != 2 or y_true.shape[1] != len(LABELS):
        raise ValueError(f"expected two (n, {len(LABELS)}) arrays, got {y_true.shape} and {y_pred.shape}")
    if len(y_true) == 0:
        raise ValueError("cannot score zero images")
    if np.isnan(y_pred).any():
        raise ValueError("predictions contain NaN")
    return y_true, np.clip(y_pred, EPS, 1 - EPS)


def per_label_log_loss(y_true, y_pred) -> np.ndarray:
    """Mean binary log loss of each of the six labels (LABELS order)."""
    y_true, p = _check(y_true, y_pred)
    ll = -(y_true * np.log(p) + (1 - y_true) * np.log(1 - p))
    return ll.mean(axis=0)


def weighted_log_loss(y_true, y_pred) -> float:
    """The competition score (lower is better)."""
    return float(np.average(per_label_log_loss(y_true, y_pred), weights=WEIGHTS))


def prior_baseline(y_train, n: int) -> np.ndarray:
    """Predict every label at its training frequency: the score to beat."""
    freq = np.asarray(y_train, dtype=np.float64).mean(axis=0)
    return np.tile(freq, (n, 1))


def log_loss_table(y_true, folds, models: dict) -> pd.DataFrame:
    """Per-label and weighted log loss, one row per model, after a "prior baseline" row.

    The prior of each fold is the label frequencies of the other folds, so it
    is an honest out-of-fold baseline like the models' OOF predictions.
    """
    y_true, folds = np.asarray(y_true, dtype=np.float64), np.asarray(folds)
    prior = np.zeros(y_true.shape)
    for k in np.unique(folds):
        held = folds == k
        prior[held] = prior_baseline(y_true[~held], int(held.sum()))
    rows = []
    for name, p in {"prior baseline": prior, **models}.items():
        rows.append({"model": name, **dict(zip(LABELS, per_label_log_loss(y_true, p))),
                     "weighted": weighted_log_loss(y_true, p)})
    return pd.DataFrame(rows).set_index("model")
