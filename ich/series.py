"""Slice order within a series, by position along the slice normal.

File names (random hex IDs) say nothing about order, and InstanceNumber is
unreliable in the competition data, so the order key is the position
projected on the slice normal (`z`, computed in ich.dicom). Ties are broken by
image_id so the order is deterministic.
"""
from __future__ import annotations

import numpy as np
import pandas as pd


def order_slices(df: pd.DataFrame) -> pd.DataFrame:
    """Sort by (series_id, z) and add slice_index, n_slices and z_spacing.

    z_spacing is the series' median gap between neighboring slices (mm), NaN
    for a one-slice series; stage two uses it as a feature.
    """
    out = df.sort_values(["series_id", "z", "image_id"], kind="mergesort").reset_index(drop=True)
    grouped = out.groupby("series_id", sort=False)
    out["slice_index"] = grouped.cumcount().astype(np.int32)
    out["n_slices"] = grouped["image_id"].transform("size").astype(np.int32)
    gap = grouped["z"].diff().abs()
    out["z_spacing"] = gap.groupby(out["series_id"], sort=False).transform("median").astype(np.float32)
    return out
