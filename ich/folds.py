"""Cross-validation folds: grouped by patient, stratified on the labels.

A patient's slices (often several studies) are strongly correlated, so a
patient never spans two folds; otherwise out-of-fold scores are optimistic and
stage two learns from leaked stage-one predictions.

Stratification is greedy and multi-label (in the spirit of iterative
stratification): patients with positives of the rarest label are placed first,
each into the fold that has the fewest positive slices of that label so far,
then the next rarer label, and finally the all-negative patients, each into
the fold with the fewest slices. The result balances every label's positive
slices and the fold sizes, deterministically for a seed.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from .labels import LABELS


def assign_folds(df: pd.DataFrame, n_folds: int = 5, seed: int = 42) -> pd.Series:
    """Fold number (0..n_folds-1) per row of df (needs patient_id and LABELS columns)."""
    patients = df.groupby("patient_id", sort=True)[list(LABELS)].sum()
    patients["n"] = df.groupby("patient_id", sort=True).size()
    if len(patients) < n_folds:
        raise ValueError(f"cannot make {n_folds} patient-grouped folds from {len(patients)} patients")
    rng = np.random.default_rng(seed)
    # random order first, so ties between equal patients are broken by the seed
    patients = patients.iloc[rng.permutation(len(patients))]

    pos = np.zeros((n_folds, len(LABELS)))
    size = np.zeros(n_folds)
    fold_of: dict[str, int] = {}

    def place(pid, row, key_label=None):
        if key_label is None:
            order = np.lexsort((rng.random(n_folds), size))
        else:
            order = np.lexsort((rng.random(n_folds), size, pos[:, key_label]))
        k = int(order[0])
        fold_of[pid] = k
        pos[k] += row[list(LABELS)].to_numpy(dtype=float)
        size[k] += row["n"]

    rarity = np.argsort(patients[list(LABELS)].astype(bool).sum().to_numpy(), kind="stable")
    for j in rarity:
        label = LABELS[j]
        todo = patients[(patients[label] > 0) & ~patients.index.isin(list(fold_of))]
        for pid, row in todo.sort_values(label, ascending=False, kind="stable").iterrows():
            place(pid, row, key_label=j)
    rest = patients[~patients.index.isin(list(fold_of))]
    for pid, row in rest.sort_values("n", ascending=False, kind="stable").iterrows():
        place(pid, row)
    return df["patient_id"].map(fold_of).astype(np.int8)
