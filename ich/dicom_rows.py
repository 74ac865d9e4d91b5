"""The image cache's rows, decoded from the DICOMs when asked: what `input.source: dicom` trains on.

A training loader indexes the cache by `cache_row` (one row per input
file, size x size x windows uint8). `DicomRows` answers the same indexing
by reading that file (a path, or a member of the competition zip:
ich.rawdata) with prepare_data's own `read_one` and the cache's image
settings, so an image is bit for bit the row prepare_data would have
written, and stage one's dataset, augmentations and sampler run unchanged.
Nothing is cached on disk: the 450 GB of DICOMs (or the 180 GB zip) is
the only copy of the images (a worker keeps its last few reads in memory).

It holds plain arrays (file names, and a zip member's offset, sizes and
CRC), no open file and no Python object per row, so the DataLoader workers
it is copied into share it without touching it, and each worker opens its
own handle on the archive (ich.rawdata).
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from .cache import IMAGES, open_images, read_meta
from .config import cache_settings, prepare_config_from
from .dicom import Rejected
from .prepare import TRAIN_DIR, read_one
from .rawdata import Member, RawDataError, open_raw

RECENT = 4  # reads a DicomRows keeps (DicomRows.decode)


class DicomRows:
    """cache_row -> image (size x size x windows uint8), read from the file prepare_data read for that row.

    Indexing as a cache's memory map: `rows[r]` or `rows[r, :, :, c]`.
    """

    def __init__(self, cache_rows, refs: list, cfg):
        cache_rows = np.asarray(cache_rows, np.int64)
        self.cfg = cfg
        self.position = np.full(int(cache_rows.max()) + 1 if len(cache_rows) else 0, -1, np.int64)
        self.position[cache_rows] = np.arange(len(cache_rows))
        zipped = bool(refs) and isinstance(refs[0], Member)
        self.archive = refs[0].archive if zipped else None
        self.folder = None if zipped or not refs else str(Path(refs[0]).parent)  # a split's files share it
        if self.folder is not None and any(str(Path(r).parent) != self.folder for r in refs):
            raise ValueError("the files of one split must share their folder")
        self.names = np.array([r.name if zipped else Path(r).name for r in refs], dtype=str)  # fixed width
        self._recent: list = []  # (key, image) of the last RECENT reads of this process (a worker's own copy)
        self.members = (np.array([(r.offset, r.compress_size, r.file_size, r.crc, r.method, r.flags) for r in refs],
                                 np.int64).reshape(-1, 6) if zipped else None)

    @property
    def shape(self) -> tuple:
        return (len(self.position), self.cfg.image_size, self.cfg.image_size, len(self.cfg.windows))

    def ref(self, row: int):
        """The file of cache row `row`: its path, or its zip member."""
        i = self.position[row] if 0 <= row < len(self.position) else -1
        if i < 0:
            raise IndexError(f"cache row {row} is no usable slice of the slice table")
        if self.archive is None:
            return Path(self.folder) / str(self.names[i])
        return Member(self.archive, str(self.names[i]), *(int(v) for v in self.members[i]))

    def __getitem__(self, key) -> np.ndarray:
        row, rest = (key[0], key[1:]) if isinstance(key, tuple) else (key, ())
        channel = rest[2] if len(rest) == 3 and rest[:2] == (slice(None), slice(None)) else None
        if isinstance(channel, (int, np.integer)) and -len(self.cfg.windows) <= channel < len(self.cfg.windows):
            return self.decode(int(row), int(channel) % len(self.cfg.windows))[:, :, 0]  # adjacent mode's read
        image = self.decode(int(row))
        return image[rest] if rest else image

    def decode(self, row: int, channel: int | None = None) -> np.ndarray:
        """Row `row` (size x size x windows), or only its window `channel` (size x size x 1): each window is
        computed on its own, so that channel is the same bytes as the row's, at a fraction of the work
        (adjacent mode reads one window of three slices). The last few reads are kept: a series' first
        and last slices are their own neighbours, and adjacent_windows reads them twice in one item."""
        key = (row, channel)
        for k, image in self._recent:
            if k == key:
                return image
        ref = self.ref(row)
        cfg = self.cfg if channel is None else replace(self.cfg, windows=(self.cfg.windows[channel],))
        try:
            image, _ = read_one(ref, cfg)
        except Rejected as rej:  # usable when prepared, not now: the files changed under the slice table
            raise RawDataError(f"{getattr(ref, 'name', ref)} was usable when prepare_data read it and is not now "
                               f"({rej}): the raw data changed; rerun prepare_data.py --force") from None
        image.flags.writeable = False  # shared with the next reads of the same row: nobody may change it
        self._recent = [(key, image), *self._recent[:RECENT - 1]]
        return image


def open_rows(clean_dir: Path, raw_dir: Path, slices: pd.DataFrame, split_dir: str = TRAIN_DIR) -> DicomRows:
    """The rows of `slices` (its `file` and `cache_row`), read from RAW_DATA_DIR with clean_dir's image settings.

    Works on a clean dir prepared with or without images (prepare config
    `images: false`): only its cache_meta.json and slice table are needed.
    """
    meta = read_meta(clean_dir)
    if meta is None:
        raise RawDataError(f"{clean_dir} has no cache_meta.json: run prepare_data.py first")
    cfg = prepare_config_from(cache_settings(meta), str(Path(clean_dir) / "cache_meta.json"))
    refs = open_raw(raw_dir).refs(split_dir, slices["file"].tolist(), clean_dir)
    return DicomRows(slices["cache_row"].to_numpy(np.int64), refs, cfg)


def has_images(clean_dir: Path) -> bool:
    """Whether prepare_data wrote the image cache there (prepare config `images: true`)."""
    return (Path(clean_dir) / IMAGES).is_file()


def split_images(clean_dir: Path, raw_dir: Path, slices: pd.DataFrame):
    """A split's images indexed by cache_row: its cache when prepare wrote one, else read from RAW_DATA_DIR
    (the report's examples and Grad-CAM of a clean dir prepared with images: false)."""
    return open_images(clean_dir) if has_images(clean_dir) else open_rows(clean_dir, raw_dir, slices)
