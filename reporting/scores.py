"""Per-label scores for the report: ROC AUC, precision-recall, thresholds, calibration.

Pure numpy / scikit-learn on (y_true, probability) columns, so it is easy to
test and reuse. A label without positives (or without negatives) in the data
gets NaN where a score is undefined instead of an exception.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.calibration import calibration_curve
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from ich.labels import LABELS


def _prf(y: np.ndarray, p: np.ndarray, threshold: float) -> tuple[float, float, float]:
    pred = p >= threshold
    tp = float(np.sum(pred & (y > 0)))
    fp = float(np.sum(pred & (y <= 0)))
    fn = float(np.sum(~pred & (y > 0)))
    precision = tp / (tp + fp) if tp + fp else float("nan")
    recall = tp / (tp + fn) if tp + fn else float("nan")
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else float("nan")
    return precision, recall, f1


def best_f1_threshold(y: np.ndarray, p: np.ndarray) -> float:
    """The probability threshold with the highest F1 (NaN without positives)."""
    if not (y > 0).any():
        return float("nan")
    precision, recall, thresholds = precision_recall_curve(y, p)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros_like(precision),
                   where=(precision + recall) > 0)
    return float(thresholds[int(np.argmax(f1[:-1]))])  # the last point has no threshold


def label_scores(y: np.ndarray, p: np.ndarray) -> dict:
    """ROC AUC, average precision, and precision / recall / F1 at 0.5 and at the F1-best threshold."""
    both = 0 < y.sum() < len(y)
    out = {"positives": int(y.sum()),
           "roc_auc": float(roc_auc_score(y, p)) if both else float("nan"),
           "avg_precision": float(average_precision_score(y, p)) if both else float("nan")}
    out["precision@0.5"], out["recall@0.5"], out["f1@0.5"] = _prf(y, p, 0.5)
    t = best_f1_threshold(y, p)
    out["best_threshold"] = t
    if np.isnan(t):
        out["precision@best"] = out["recall@best"] = out["f1@best"] = float("nan")
    else:
        out["precision@best"], out["recall@best"], out["f1@best"] = _prf(y, p, t)
    return out


def scores_table(y: np.ndarray, models: dict[str, np.ndarray]) -> pd.DataFrame:
    """One row per (label, model): label_scores of each model's column."""
    rows = []
    for j, label in enumerate(LABELS):
        for name, p in models.items():
            rows.append({"label": label, "model": name, **label_scores(y[:, j], p[:, j])})
    return pd.DataFrame(rows)


def pr_curve(y: np.ndarray, p: np.ndarray):
    """(recall, precision) arrays, or None without positives."""
    if not (y > 0).any():
        return None
    precision, recall, _ = precision_recall_curve(y, p)
    return recall, precision


def calibration(y: np.ndarray, p: np.ndarray, n_bins: int = 10):
    """(mean predicted, observed frequency, count per non-empty bin), uniform bins on [0, 1]."""
    frac_pos, mean_pred = calibration_curve(y, p, n_bins=n_bins, strategy="uniform", pos_label=1)
    inner = np.linspace(0.0, 1.0, n_bins + 1)[1:-1]
    counts = np.bincount(np.searchsorted(inner, p), minlength=n_bins)  # binned as calibration_curve does
    return mean_pred, frac_pos, counts[counts > 0]


def expected_calibration_error(y: np.ndarray, p: np.ndarray, n_bins: int = 10) -> float:
    mean_pred, frac_pos, counts = calibration(y, p, n_bins)
    return float(np.sum(counts * np.abs(mean_pred - frac_pos)) / max(counts.sum(), 1))
