"""The image cache: one uint8 array of every image, read by memory mapping.

Layout, in a clean dir:
- `images.npy`: shape (n_files, size, size, n_windows), uint8, one row per
  input file in sorted file-name order (rows of rejected files stay zero).
  A `.npy` header makes it self-describing; `np.load(mmap_mode="r")` gives
  random access without decoding anything, so a training loader reads one
  image in microseconds, and the OS page cache does the rest. prepare writes it with one pwrite per chunk of
  consecutive rows (ich.prepare), so a worker holds at most one chunk of images.
- `cache_meta.json`: the settings the cache was built with (size, windows,
  sigmoid, crop, chunk size), the number of files and a digest of their names:
  a rerun reuses the cache only when all of these match.
- `parts/chunk_XXXXXXXX.parquet`: per-chunk results (header fields, quality,
  rejection reasons). A chunk is done when its part exists: that is what
  makes a killed run resumable without redoing finished chunks.

Why this format (see BENCHMARKS.md): decoding DICOM costs about a millisecond
per slice and PNG encoding several more; a memory-mapped uint8 array costs
nothing to decode and writes at disk speed. Its price is size: 196,608 bytes
per image at 256 px with three windows (about 172 GB for the full train and
test data, against about 450 GB of DICOMs). Rows follow file order, not slice
order, so prepare can write each image as soon as it is read (one pass over
the DICOMs); a reader finds neighbors through slices.parquet's `cache_row`.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np

IMAGES = "images.npy"
META = "cache_meta.json"
PARTS = "parts"
FORMAT_VERSION = 1


def files_digest(names) -> str:
    h = hashlib.sha1()
    for name in names:
        h.update(name.encode())
        h.update(b"\0")
    return h.hexdigest()


# the cache_meta.json keys that decide what an image looks like (not which files it holds)
IMAGE_KEYS = ("format", "image_size", "windows", "sigmoid", "crop_border")


def image_settings(meta: dict | None) -> dict:
    """The image-defining part of a cache's meta: a model trained on one cache needs the same at test time."""
    return {k: (meta or {}).get(k) for k in IMAGE_KEYS}


def read_meta(clean_dir: Path) -> dict | None:
    path = Path(clean_dir) / META
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def write_atomic(path: Path, write) -> None:
    """Write through a temporary file and rename, so a crash never leaves half a file.

    The temporary file is `.<name>.tmp<PID>`. One left beside the target by a
    process that no longer runs (kill -9 mid-write) is removed first, so such
    litter does not stay for good; a live process's is left alone.
    """
    path = Path(path)
    prefix = f".{path.name}.tmp"
    try:
        stale = [n for n in os.listdir(path.parent) if n.startswith(prefix) and n[len(prefix):].isdigit()]
    except OSError:
        stale = []
    for name in stale:
        try:
            os.kill(int(name[len(prefix):]), 0)  # signal 0: only asks whether the PID runs
        except ProcessLookupError:
            (path.parent / name).unlink(missing_ok=True)
        except (PermissionError, OverflowError):
            pass  # running under another user (or no PID at all): not ours to judge
    tmp = path.with_name(f"{prefix}{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


class DiskSpaceError(RuntimeError):
    """The cache would not fit on its disk; raised before any image is written."""


def check_free_space(clean_dir: Path, n: int, size: int, channels: int) -> int:
    """Raise DiskSpaceError unless the rest of the cache fits; return the bytes still needed.

    The cache is a sparse file that fills as chunks are written, so a full
    disk would otherwise show up hours into a run as a failed write. What a
    resumed run has written already (the file's allocated blocks) counts.
    """
    clean_dir = Path(clean_dir)
    total = n * size * size * channels
    path = clean_dir / IMAGES
    written = path.stat().st_blocks * 512 if path.is_file() else 0
    needed = max(total - written, 0)
    free = shutil.disk_usage(clean_dir).free
    if needed > free:
        gb = 1e9
        raise DiskSpaceError(
            f"the image cache needs {needed / gb:.1f} GB more in {clean_dir} ({n:,} images x {size} px x "
            f"{channels} windows = {total / gb:.1f} GB) but only {free / gb:.1f} GB are free: free some space, "
            "point the clean path of SETTINGS.json at a larger disk, or choose a smaller image_size")
    return needed


def create_images(clean_dir: Path, n: int, size: int, channels: int) -> None:
    # open_memmap makes a sparse file: untouched rows cost no disk and read as zeros
    arr = np.lib.format.open_memmap(Path(clean_dir) / IMAGES, mode="w+", dtype=np.uint8,
                                    shape=(n, size, size, channels))
    del arr


def write_rows(clean_dir: Path, start: int, rows: np.ndarray) -> None:
    """Write consecutive rows [start, start + len(rows)) of images.npy with one pwrite.

    Faster than assigning into a memory map from several processes: no page
    fault per 4 KB page, one copy into the page cache, no msync.
    """
    path = Path(clean_dir) / IMAGES
    with open(path, "r+b") as f:
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read_header(f)
        offset = f.tell()
        row_bytes = int(np.prod(shape[1:])) * np.dtype(dtype).itemsize
        if rows.shape[1:] != tuple(shape[1:]) or rows.dtype != dtype or start + len(rows) > shape[0]:
            raise ValueError(f"rows {rows.shape} {rows.dtype} do not fit {path} {shape} {dtype} at {start}")
        os.pwrite(f.fileno(), np.ascontiguousarray(rows).data, offset + start * row_bytes)


def open_images(clean_dir: Path, writable: bool = False) -> np.ndarray:
    """The cache as a memory map: (n_rows, size, size, channels) uint8."""
    return np.load(Path(clean_dir) / IMAGES, mmap_mode="r+" if writable else "r")


def save_npy_atomic(path: Path, array: np.ndarray) -> None:
    def write(tmp):
        with open(tmp, "wb") as f:
            np.save(f, array)
    write_atomic(path, write)
