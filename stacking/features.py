"""Neighbor-slice features from stage-one outputs.

A hemorrhage spans several slices, so a slice's neighbors say much about it:
the stage-one probabilities of the k previous and k next slices of the same
series (NaN past the series ends, which LightGBM handles natively), the
differences to them, per-series mean / max / std of each label, and where the
slice sits (relative position, number of slices, spacing). When
slices.parquet has prepare_data's `brain_fraction` (share of brain-HU
pixels): that of the slice, its series' mean and max, and the slice's share
of that max, which say where in the head the slice is (skull base and vertex
slices hold little brain), which the slice index does not when series cover
different ranges. Optionally a few principal components of the pooled CNN
embeddings and their differences to the neighbors. Everything is vectorised
on arrays sorted by (series, slice).
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from ich.labels import LABELS

SHORT = {"epidural": "epi", "intraparenchymal": "iph", "intraventricular": "ivh",
         "subarachnoid": "sah", "subdural": "sdh", "any": "any"}


def _shift(values: np.ndarray, codes: np.ndarray, j: int) -> np.ndarray:
    """values of the slice j positions later (j > 0) or earlier (j < 0) in the same series, else NaN."""
    out = np.full(values.shape, np.nan, dtype=np.float32)
    n = len(values)
    if abs(j) >= n:
        return out
    if j > 0:
        same = codes[j:] == codes[:-j]
        out[:-j][same] = values[j:][same]
    else:
        j = -j
        same = codes[:-j] == codes[j:]
        out[j:][same] = values[:-j][same]
    return out


def _series_stats(values: np.ndarray, codes: np.ndarray):
    """Per-series mean, max and std, broadcast back to rows (codes sorted, contiguous)."""
    starts = np.flatnonzero(np.r_[True, codes[1:] != codes[:-1]])
    counts = np.diff(np.r_[starts, len(codes)])
    total = np.add.reduceat(values, starts, axis=0)
    mean = total / counts[:, None]
    sq = np.add.reduceat(values.astype(np.float64) ** 2, starts, axis=0) / counts[:, None]
    std = np.sqrt(np.maximum(sq - mean.astype(np.float64) ** 2, 0)).astype(np.float32)
    mx = np.maximum.reduceat(values, starts, axis=0)
    rep = lambda a: np.repeat(a, counts, axis=0).astype(np.float32)  # noqa: E731
    return rep(mean), rep(mx), rep(std)


def _brain_fraction(values: np.ndarray, codes: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """The slice's brain fraction, its series' mean and max, and the slice's value / the series max.

    The ratio places the slice between the skull base / vertex (small) and
    the widest brain section (1) whatever the head size or field of view;
    NaN for a series with no brain pixels at all (LightGBM handles NaN).
    """
    b = np.asarray(values, dtype=np.float32)[:, None]
    mean, mx, _ = _series_stats(b, codes)
    rel = np.divide(b, mx, out=np.full_like(b, np.nan), where=mx > 0)
    return np.concatenate([b, mean, mx, rel], axis=1), [
        "brain_fraction", "brain_fraction.series_mean", "brain_fraction.series_max", "brain_fraction.rel_series_max"]


def build_features(slices: pd.DataFrame, probs: dict[str, np.ndarray], *, k: int = 5,
                   embeddings: dict[str, np.ndarray] | None = None,
                   neighbors: str = "mean") -> tuple[np.ndarray, list[str]]:
    """Feature matrix (rows aligned with `slices`) and feature names.

    probs[name]: (n, 6) stage-one probabilities in `slices` row order;
    embeddings[name]: (n, c) already reduced (e.g. PCA) embeddings, same order.
    The features of one call must come from one stage-one model per row
    (stacking.run builds one matrix for the OOF rows and one per fold model
    for test), never from a mean over fold models.
    slices needs series_id, slice_index, n_slices, z_spacing; with a
    `brain_fraction` column it adds 4 features (`_brain_fraction`), without
    one (tables from before prepare_data wrote it) it leaves them out rather
    than adding NaN columns, so old and new tables give different feature
    sets: train and test must come from the same prepare_data
    (stacking.run checks that their feature names agree).
    neighbors: with several experiments, whose neighbor-slice features to
    build: "mean" (of the experiments' probabilities; each experiment still
    gives its own probabilities and series statistics) or "each". "mean"
    cuts two experiments' features from 345 to 225 and the boosting time by
    a third, and scored slightly better, not worse, on benchmarks/stacking.py's
    data (BENCHMARKS.md): the experiments see the same images, so their
    neighbors say much the same, and the mean is less noisy.
    The differences to the far neighbors earn their place: without those
    beyond +-2 (249 features instead of 345) honest OOF was 0.0007 worse on
    every fold of a held-out generated table (BENCHMARKS.md).
    """
    if neighbors not in ("mean", "each"):
        raise ValueError(f"neighbors must be 'mean' or 'each', not {neighbors!r}")
    order = np.lexsort((slices["slice_index"].to_numpy(), slices["series_id"].to_numpy()))
    codes = pd.factorize(slices["series_id"].to_numpy()[order])[0]
    blocks, names = [], []

    def add(block, block_names):
        blocks.append(np.asarray(block, dtype=np.float32).reshape(len(order), -1))
        names.extend(block_names)

    def add_neighbors(p, tag):
        for j in range(1, k + 1):
            for sign, word in ((-1, "prev"), (1, "next")):
                q = _shift(p, codes, sign * j)
                add(q, [f"{t}.{word}{j}" for t in tag])
                add(p - q, [f"{t}.diff_{word}{j}" for t in tag])

    n_slices = slices["n_slices"].to_numpy()[order].astype(np.float32)
    index = slices["slice_index"].to_numpy()[order].astype(np.float32)
    add(np.where(n_slices > 1, index / np.maximum(n_slices - 1, 1), 0.5), ["rel_position"])
    add(n_slices, ["n_slices"])
    add(slices["z_spacing"].to_numpy()[order], ["z_spacing"])
    if "brain_fraction" in slices:
        add(*_brain_fraction(slices["brain_fraction"].to_numpy()[order], codes))

    each = neighbors == "each" or len(probs) == 1
    for exp, p in probs.items():
        p = np.asarray(p, dtype=np.float32)[order]
        tag = [f"{exp}.{SHORT[c]}" for c in LABELS]
        add(p, tag)
        if each:
            add_neighbors(p, tag)
        mean, mx, std = _series_stats(p, codes)
        add(mean, [f"{t}.series_mean" for t in tag])
        add(mx, [f"{t}.series_max" for t in tag])
        add(std, [f"{t}.series_std" for t in tag])
    if len(probs) > 1:
        avg = np.mean([np.asarray(p, dtype=np.float32)[order] for p in probs.values()], axis=0)
        tag = [f"mean.{SHORT[c]}" for c in LABELS]
        add(avg, tag)
        if not each:
            add_neighbors(avg, tag)

    for exp, e in (embeddings or {}).items():
        e = np.asarray(e, dtype=np.float32)[order]
        tag = [f"{exp}.pc{i}" for i in range(e.shape[1])]
        add(e, tag)
        for sign, word in ((-1, "prev"), (1, "next")):
            add(e - _shift(e, codes, sign), [f"{t}.diff_{word}1" for t in tag])

    out = np.empty((len(order), sum(b.shape[1] for b in blocks)), dtype=np.float32)
    col = 0
    while blocks:  # each block into place, back in slices row order, and freed: one copy of X at the peak
        block = blocks.pop(0)
        out[order, col:col + block.shape[1]] = block
        col += block.shape[1]
    return out, names


def series_inputs(slices: pd.DataFrame, probs: dict[str, np.ndarray], pcs: dict[str, np.ndarray]) -> np.ndarray:
    """The sequence member's (stacking.sequence) per-slice inputs, (n, d) in `slices` row order.

    Every experiment's stage-one logits and aligned PCA components (in
    config order), the relative position, the z spacing, and the brain
    fraction when slices.parquet has it. No neighbour features: the member
    reads the series itself. Not the LightGBM member's OOF output either:
    OOF row j of it came from boosters that saw fold k's labels, so a
    sequence member k trained on it would see the labels it is scored on.
    """
    n_slices = slices["n_slices"].to_numpy(np.float32)
    index = slices["slice_index"].to_numpy(np.float32)
    clip = lambda p: np.clip(np.asarray(p, dtype=np.float64), 1e-6, 1 - 1e-6)  # noqa: E731
    cols = [np.log(clip(p) / (1 - clip(p))).astype(np.float32) for p in probs.values()]
    cols += [np.asarray(e, dtype=np.float32) for e in pcs.values()]
    cols.append(np.where(n_slices > 1, index / np.maximum(n_slices - 1, 1), 0.5)[:, None])
    cols.append(slices["z_spacing"].to_numpy(np.float32)[:, None])
    if "brain_fraction" in slices:
        cols.append(slices["brain_fraction"].to_numpy(np.float32)[:, None])
    return np.nan_to_num(np.concatenate(cols, axis=1), nan=0.0, posinf=0.0, neginf=0.0)
