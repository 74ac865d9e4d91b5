"""Stage-one data: slices.parquet + the image cache -> uint8 tensors.

The dataset never decodes DICOM: it reads rows of the memory-mapped cache
(ich.cache). Batches stay uint8 until they reach the device, where the model
normalizes them (4x less to copy than float32).

Input modes (config `input.mode`):
- windows: the cached windows of one slice as channels;
- adjacent: one cached window (input.adjacent_channel) of slices i-1, i, i+1
  of the same series, neighbors found by slice_index (edges repeat the slice);
- adjacent_windows: every cached window of slices i-1, i, i+1 (9 channels
  with 3 windows, ordered slice by slice): the neighbors' context without
  giving up the subdural and bone windows. The network's first convolution
  is widened to match (timm's in_chans, models.net).

Persistent workers. The training loader keeps its worker processes for the
whole fold: restarted every epoch, a dozen workers fork again and the first
batches of each epoch wait for them to start and refill the pipeline. A worker
holds its own copy of the dataset, made when it started, so what the main
process changes later (the epoch's size under progressive resizing, the
epoch whose augmentation stream to draw) never reaches it. So the sampler
sends those facts with every index: `EpochSampler(tagged=True)` yields
`EpochItem(index, epoch, size)`, and the dataset (`EpochAware`) applies the
size and, at the first item of a new epoch, calls its `on_epoch` hook
(models.augment.EpochSeeder reseeds the augmentations there).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset, Sampler

from ich import cache
from ich.labels import LABELS

cv2.setNumThreads(1)


MODES = ("windows", "adjacent", "adjacent_windows")


def input_channels(mode: str, n_windows: int) -> int:
    """Channels the network sees for an input mode and a cache of n_windows windows."""
    return {"windows": n_windows, "adjacent": 3, "adjacent_windows": 3 * n_windows}[mode]


def with_neighbors(slices: pd.DataFrame) -> pd.DataFrame:
    """Add prev_row / next_row: cache rows of the neighbor slices in the same series."""
    s = slices.sort_values(["series_id", "slice_index"], kind="mergesort")
    same_prev = s["series_id"].eq(s["series_id"].shift(1))
    same_next = s["series_id"].eq(s["series_id"].shift(-1))
    rows = s["cache_row"]
    prev = rows.shift(1).where(same_prev, rows)
    nxt = rows.shift(-1).where(same_next, rows)
    out = slices.copy()
    out["prev_row"] = prev.reindex(slices.index).astype(np.int64)
    out["next_row"] = nxt.reindex(slices.index).astype(np.int64)
    return out


class EpochItem(NamedTuple):
    """An index with the facts of its epoch, as a tagged EpochSampler hands it to the dataset."""
    index: int
    epoch: int
    size: int | None = None  # None: the dataset's own size


class EpochAware:
    """Mixin for a dataset that takes plain indices or EpochItems (see the module docstring).

    `on_epoch(dataset, epoch)`, if set, runs in the process that makes the
    items (a worker, or the main process with num_workers=0) before the
    first item of each new epoch it sees. Every worker sees every epoch's
    first batch it is sent, so each reseeds once per epoch, whichever items
    it gets.
    """
    epoch: int | None = None
    on_epoch = None

    def start_item(self, key) -> int:
        """The plain index of `key`, after applying its epoch's size and epoch hook."""
        if not isinstance(key, EpochItem):
            return key
        if key.size is not None:
            self.size = key.size
        if key.epoch != self.epoch:
            self.epoch = key.epoch
            if self.on_epoch is not None:
                self.on_epoch(self, key.epoch)
        return key.index


class SliceDataset(EpochAware, Dataset):
    """Item i (or EpochItem) -> (uint8 tensor C x H x W, float32 labels (6,) or zeros, i)."""

    def __init__(self, table: pd.DataFrame, clean_dir: str | Path | None, *, mode: str = "windows",
                 channel: int = 0, size: int = 256, transform=None, images: np.ndarray | None = None):
        """clean_dir: the image cache `cache_row` indexes; or `images` (n x H x W x windows uint8, the
        cache's layout) already in memory: the in-memory engine (pipeline.decode) and Grad-CAM."""
        self.clean_dir = None if clean_dir is None else str(clean_dir)
        self.rows = table["cache_row"].to_numpy(np.int64)
        neighbors = mode in ("adjacent", "adjacent_windows")
        self.prev = table["prev_row"].to_numpy(np.int64) if neighbors else None
        self.next = table["next_row"].to_numpy(np.int64) if neighbors else None
        has_labels = all(c in table for c in LABELS)
        self.labels = (np.array(table[list(LABELS)].to_numpy(np.float32)) if has_labels
                       else np.zeros((len(table), len(LABELS)), np.float32))
        self.mode, self.channel, self.size, self.transform = mode, channel, size, transform
        self._images = images  # None: the cache, opened lazily (a memmap must not be pickled into workers)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def images(self) -> np.ndarray:
        if self._images is None:
            self._images = cache.open_images(Path(self.clean_dir))
        return self._images

    def image(self, i: int) -> np.ndarray:
        """HxWxC uint8 as the network sees it (before augmentation)."""
        if self.mode == "windows":
            img = np.asarray(self.images[self.rows[i]])
        elif self.mode == "adjacent_windows":
            img = np.concatenate([self.images[self.prev[i]], self.images[self.rows[i]],
                                  self.images[self.next[i]]], axis=-1)
        else:
            c = self.channel
            img = np.stack([self.images[self.prev[i], :, :, c], self.images[self.rows[i], :, :, c],
                            self.images[self.next[i], :, :, c]], axis=-1)
        if img.shape[0] != self.size or img.shape[1] != self.size:
            img = self._resize(img)
        return img

    def _resize(self, img: np.ndarray) -> np.ndarray:
        """To size x size; OpenCV resizes at most 4 channels at a time, so adjacent_windows' 9 go by threes."""
        interpolation = cv2.INTER_AREA if img.shape[0] > self.size else cv2.INTER_LINEAR
        parts = []
        for c in range(0, img.shape[2], 3):
            part = cv2.resize(np.ascontiguousarray(img[:, :, c:c + 3]), (self.size, self.size),
                              interpolation=interpolation)
            parts.append(part[:, :, None] if part.ndim == 2 else part)
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=-1)

    def __getitem__(self, key):
        i = self.start_item(key)
        img = self.image(i)
        if self.transform is not None:
            by_label = {"positive": bool(self.labels[i, -1])} if getattr(self.transform, "by_label", False) else {}
            img = self.transform(image=img, **by_label)["image"]
        x = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))
        return x, torch.tensor(self.labels[i]), i


class EpochSampler(Sampler):
    """Indices for one epoch: all items or balanced, shuffled by (seed, epoch), sharded by rank.

    One sampler serves both single-process and DistributedDataParallel
    training: every rank draws the same permutation from (seed, epoch) and
    takes every world_size-th item, padded so all ranks see as many batches.
    `balanced`: every positive (`any`) plus neg_ratio times as many negatives,
    redrawn each epoch, so the network sees all negatives over many epochs.
    `tagged`: yield EpochItem(index, epoch, size) instead of plain indices, so
    persistent loader workers learn the epoch and its size (module docstring).
    The sampler is iterated in the main process at the start of each epoch, so
    `set_epoch` before iterating is enough.
    `eligible` (a boolean mask, default all): the items it may draw at all.
    The trainer passes `brain_fraction >= sampler.min_brain_fraction`, so
    training skips the near-empty slices above and below the head, as a
    founding write-up did. Validation, OOF and test loaders draw everything.
    The selection is on the image, not the label, so p(label | image) of the
    slices kept is unchanged: no prior correction is needed for it (the
    balanced sampler's `neg_keep` counts eligible negatives only).
    """

    def __init__(self, labels_any: np.ndarray, *, kind: str = "all", neg_ratio: float = 1.0,
                 shuffle: bool = True, seed: int = 0, rank: int = 0, world_size: int = 1, tagged: bool = False,
                 eligible: np.ndarray | None = None):
        keep = np.ones(len(labels_any), bool) if eligible is None else np.asarray(eligible, bool)
        self.pos = np.flatnonzero((labels_any > 0) & keep)
        self.neg = np.flatnonzero((labels_any <= 0) & keep)
        self.items = np.flatnonzero(keep)
        self.n_all = len(self.items)
        self.kind, self.neg_ratio, self.shuffle, self.seed = kind, neg_ratio, shuffle, seed
        self.rank, self.world_size, self.tagged = rank, world_size, tagged
        self.epoch, self.size = 0, None

    def set_epoch(self, epoch: int, size: int | None = None) -> None:
        """The epoch to draw (and, tagged, the image size its items are made at; None: the dataset's)."""
        self.epoch, self.size = epoch, size

    @property
    def n_negatives_drawn(self) -> int:
        if self.kind == "balanced" and len(self.pos):
            return min(len(self.neg), int(round(self.neg_ratio * len(self.pos))))
        return len(self.neg)

    @property
    def neg_keep(self) -> float:
        """Share of the `any`-negatives an epoch draws (1.0: all): the prior shift models.net undoes."""
        return self.n_negatives_drawn / len(self.neg) if len(self.neg) else 1.0

    def epoch_indices(self) -> np.ndarray:
        rng = np.random.default_rng([self.seed, self.epoch])
        if self.kind == "balanced" and len(self.pos):
            idx = np.concatenate([self.pos, rng.choice(self.neg, self.n_negatives_drawn, replace=False)])
        else:
            idx = self.items
        if self.shuffle:
            idx = rng.permutation(idx)
        per_rank = math.ceil(len(idx) / self.world_size)
        if per_rank * self.world_size > len(idx):  # pad by repeating the start
            idx = np.concatenate([idx, idx[: per_rank * self.world_size - len(idx)]])
        return idx[self.rank::self.world_size]

    def __iter__(self):
        indices = self.epoch_indices().tolist()
        if self.tagged:
            return iter([EpochItem(i, self.epoch, self.size) for i in indices])
        return iter(indices)

    def __len__(self) -> int:
        n = len(self.pos) + self.n_negatives_drawn if self.kind == "balanced" and len(self.pos) else self.n_all
        return math.ceil(n / self.world_size)
