"""DICOM files -> every experiment's network inputs, in DataLoader workers, in memory.

What prepare_data and the image cache do for the batch path, without the
cache (or, from a prepared cache, `CachedSlices`: the same network inputs
from images.npy's rows, so stage one on a test split has one loop whatever
its source): a worker takes one group of whole series (a study's chosen series,
or a few series of a test split), runs `ich.prepare.decode_files` on it
(the same header checks, HU, windows, resize, crop and rejection reasons,
with the train cache's image settings; series order by z) and builds each
distinct network input (`InputSpec`: input mode, adjacent channel, size)
with stage one's own `models.data.SliceDataset`, neighbours taken from the
series' z-order. The main process only runs the models.

`Decoder` keeps its workers for its whole life (persistent workers): the
web server decodes every upload in workers started once, at start-up, and
never on a request's thread. The groups to decode are handed to the
DataLoader through its sampler, which yields the groups themselves; the
dataset maps a group to its `Decoded`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ich.cache import open_images
from ich.config import PrepareConfig
from ich.prepare import decode_files
from models.data import SliceDataset, with_neighbors


class InputSpec(NamedTuple):
    """One network input: what SliceDataset needs besides the images (experiment config `input`, final size)."""
    mode: str
    channel: int
    size: int


class SliceFile(NamedTuple):
    """One DICOM file: where it is (a path; the file's bytes: a caller that holds them in memory needs
    no disk; or a zip's ich.rawdata.Member, read in place), the name to report it by, and its image_id
    (None: prepare_data's rule, the file name, or its SOPInstanceUID when the name is no safe ID)."""
    path: object  # str | bytes | ich.rawdata.Member
    name: str
    image_id: str | None = None


@dataclass
class Decoded:
    """One group of series, decoded: usable slices in series z-order, the rejected files with reasons,
    each InputSpec's batch (uint8, n x C x H x W, rows as `slices`), and the cache-like windows when kept."""
    slices: pd.DataFrame
    rejected: pd.DataFrame
    inputs: dict[InputSpec, torch.Tensor]
    images: torch.Tensor | None = None  # n x H x W x windows uint8, rows as `slices`


def network_inputs(images: np.ndarray, slices: pd.DataFrame, specs) -> dict[InputSpec, torch.Tensor]:
    """Each spec's network input for every row of `slices` (cache_row indexes `images`), as stage one's
    SliceDataset makes it from the cache, neighbours included."""
    table = with_neighbors(slices)
    out = {}
    for spec in specs:
        data = SliceDataset(table, None, mode=spec.mode, channel=spec.channel, size=spec.size, images=images)
        batch = np.stack([data.image(i) for i in range(len(table))]) if len(table) else np.zeros(
            (0, spec.size, spec.size, 1), np.uint8)
        out[spec] = torch.from_numpy(np.ascontiguousarray(batch.transpose(0, 3, 1, 2)))
    return out


def decoded_from(images: np.ndarray, slices: pd.DataFrame, rejected: pd.DataFrame, specs,
                 keep: bool = False) -> Decoded:
    """decode_files' output (cache-like images, slices, rejected) -> Decoded: each spec's network input and,
    with keep, the images in the slices' order. The web app decodes in its own processes and hands this
    to Engine.predict_decoded."""
    slices = slices.reset_index(drop=True)
    inputs = network_inputs(images, slices, specs)
    kept = torch.from_numpy(images[slices["cache_row"].to_numpy(np.int64)]) if keep else None
    slices["cache_row"] = np.arange(len(slices), dtype=np.int64)  # now: the row in this group's arrays
    return Decoded(slices, rejected, inputs, kept)


class CachedSlices:
    """A prepared split's image cache as the engine's input: a group is row positions of the split's slice
    table (whole series), its images read from images.npy (memory-mapped in each worker) instead of
    decoded. The same network inputs as from the DICOMs: SliceDataset over the cache's rows."""

    def __init__(self, clean_dir: Path, slices: pd.DataFrame):
        self.clean_dir, self.slices = Path(clean_dir), slices.reset_index(drop=True)
        self._images = None  # opened lazily: a memmap is not pickled into the workers

    def __getstate__(self):
        return {**self.__dict__, "_images": None}

    def groups(self, max_rows: int = 64) -> list[tuple[int, ...]]:
        """Whole series, in the table's order, packed into groups of at most max_rows rows (or one series):
        about what a streamed group holds, so the decode workers' queue stays small (a 512-px group of 64
        rows is 50 MB a network input)."""
        out, current = [], []
        series = self.slices.groupby("series_id", sort=False).indices.values()
        for rows in sorted(series, key=lambda r: r[0]):
            if current and len(current) + len(rows) > max_rows:
                out.append(tuple(current))
                current = []
            current.extend(int(r) for r in rows)
        return out + ([tuple(current)] if current else [])

    def read(self, rows) -> tuple[np.ndarray, pd.DataFrame, pd.DataFrame]:
        """decode_files' three results for these rows: the images (the whole cache; cache_row indexes it),
        the rows' slices, no rejected file (prepare_data listed those already)."""
        if self._images is None:
            self._images = open_images(self.clean_dir)
        slices = self.slices.iloc[list(rows)].reset_index(drop=True)
        return self._images, slices, pd.DataFrame(columns=["file", "reason"])


class _Groups(Dataset):
    """item (a tuple of SliceFile, or of a CachedSlices' rows; keep_images) -> Decoded."""

    def __init__(self, cfg: PrepareConfig, specs: tuple[InputSpec, ...], cache: CachedSlices | None = None):
        self.cfg, self.specs, self.cache = cfg, specs, cache

    def __getitem__(self, item) -> Decoded:
        group, keep = item
        if self.cache is not None:
            images, slices, rejected = self.cache.read(group)
        else:
            images, slices, rejected = decode_files([(f.path, f.name, f.image_id) for f in group], self.cfg)
        return decoded_from(images, slices, rejected, self.specs, keep)


class _Handed(Sampler):
    """Yields the items set last: the DataLoader passes each to the dataset as its 'index'."""

    def __init__(self):
        self.items: list = []

    def __iter__(self):
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)


def as_is(item):
    """A DataLoader collate_fn that hands each item over as the dataset made it."""
    return item


class Decoder:
    """Groups of files (or, with `cache`, of its rows) -> Decoded, in order, made by `num_workers`
    persistent DataLoader workers (0: in the calling thread; tests and the 2-core demo)."""

    def __init__(self, cfg: PrepareConfig, specs, num_workers: int = 0, cache: CachedSlices | None = None):
        self.cfg, self.specs, self.cache = cfg, tuple(dict.fromkeys(specs)), cache
        self.num_workers = max(0, int(num_workers))
        self._sampler = _Handed()
        self._loader = DataLoader(_Groups(cfg, self.specs, cache), batch_size=None, sampler=self._sampler,
                                  num_workers=self.num_workers, collate_fn=as_is,
                                  persistent_workers=self.num_workers > 0,
                                  prefetch_factor=2 if self.num_workers else None)

    def start(self) -> None:
        """Start the workers now (a pass over nothing): the first real pass does not wait for them."""
        for _ in self(()):
            pass

    def __call__(self, groups, keep_images: bool = False):
        """Yield each group's Decoded, in the groups' order. Not re-entrant: one pass at a time."""
        self._sampler.items = [(tuple(g), keep_images) for g in groups]
        yield from self._loader


def default_workers() -> int:
    """Decode workers for a whole test split: every core but one for the main process, at most 12."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(12, cores - 1))
