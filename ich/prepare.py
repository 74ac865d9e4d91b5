"""prepare_data's work: DICOM folder -> slices.parquet, rejected.csv, image cache.

One pass over the files: each worker process takes a chunk of files, reads
each once (header + pixels), windows it into a chunk buffer, writes the
buffer into the cache with one pwrite and returns the header fields. Slice
order, labels and folds are computed afterwards from those fields alone.
Memory stays flat: a worker holds one chunk of small images (chunk_size x
196 KB at 256 px) plus the file it reads, which ich.dicom bounds through
`max_pixels` before anything is decoded; the parent holds only table rows.

Bad input never stops a run (README, "What happens to bad input"): every
file ends in slices.parquet or in rejected.csv with a reason. Workers die
with prepare_data, even on kill -9 (`_die_with_parent`), and the chunks
finished by then are kept for the rerun.
"""
from __future__ import annotations

import ctypes
import json
import multiprocessing
import os
import shutil
import signal
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor, as_completed, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from . import cache
from .config import PrepareConfig
from .dicom import SAFE_ID, Rejected, max_file_bytes, read_stored
from .folds import assign_folds
from .image import process_slice
from .labels import LABELS, read_labels
from .rawdata import (LABELS_CSV, TEST_DIR, TRAIN_DIR, RawDataError, list_files,  # noqa: F401 - TEST_DIR,
                      open_raw, readable)                                            # list_files: for callers
from .series import order_slices



class PrepareError(RuntimeError):
    """prepare_data cannot go on; the message says what to do."""


@dataclass
class Summary:
    split: str
    clean_dir: Path
    n_files: int = 0
    n_images: int = 0
    n_series: int = 0
    n_studies: int = 0
    n_patients: int = 0
    positives: dict = field(default_factory=dict)
    rejected: dict = field(default_factory=dict)
    fixes: dict = field(default_factory=dict)
    labels_without_image: int = 0
    id_mismatch: int = 0  # usable images whose file name differs from their SOPInstanceUID
    id_mismatch_example: str = ""
    chunks_done_before: int = 0
    seconds: float = 0.0

    def lines(self) -> list[str]:
        out = [
            f"{self.split}: {self.n_images} images in {self.n_series} series, {self.n_studies} studies, "
            f"{self.n_patients} patients ({self.n_files} files, {self.seconds:.1f} s"
            + (f", {self.chunks_done_before} chunks reused" if self.chunks_done_before else "") + ")",
        ]
        if self.positives:
            pos = ", ".join(f"{k} {v} ({v / max(self.n_images, 1):.1%})" for k, v in self.positives.items())
            out.append(f"  positives: {pos}")
        if self.fixes:
            out.append("  fixes applied: " + ", ".join(f"{k} {v}" for k, v in self.fixes.items()))
        total = sum(self.rejected.values())
        reasons = ", ".join(f"{k} {v}" for k, v in self.rejected.items())
        out.append(f"  rejected: {total}" + (f" ({reasons})" if total else ""))
        if self.id_mismatch:
            out.append(f"  warning: {self.id_mismatch} file name(s) differ from the SOPInstanceUID inside "
                       f"(e.g. {self.id_mismatch_example}); image_id is the file name, the UID is in "
                       "slices.parquet's sop_uid")
        if self.labels_without_image:
            out.append(f"  label rows for {self.labels_without_image} images with no file (ignored)")
        out.append(f"  written to {self.clean_dir}")
        return out


def image_id_for(name: str, sop_uid: str | None) -> str | None:
    """A file's image_id: its name without `.dcm`, or its SOPInstanceUID when the name is no safe ID.

    In Kaggle's data the two are equal. Where they differ the file name wins:
    the sample submission (and the label csv) are keyed by the names of the
    files Kaggle handed out, so a row keyed by a name must get the prediction
    of the image in that file; the UID stays in the `sop_uid` column and the
    summary warns with an example.
    """
    stem = name[:-4] if name.lower().endswith(".dcm") else name
    if SAFE_ID.match(stem) and stem not in (".", ".."):
        return stem
    return sop_uid


# what a worker returns per file besides image_id; `sop_uid` is the header's SOPInstanceUID
HEADER_COLUMNS = ("sop_uid", "patient_id", "study_id", "series_id", "z", "rows", "cols",
                  "pixel_spacing", "window_center", "window_width")
PLACE_COLUMNS = ("sop_uid", "patient_id", "study_id", "series_id", "z")  # where a rejected image sits


def _header_fields(header, columns) -> dict:
    return {k: header.image_id if k == "sop_uid" else header.z if k == "z" else getattr(header, k)
            for k in columns}


def read_one(path, cfg: PrepareConfig) -> tuple[np.ndarray, dict]:
    """One file (a path, its bytes, or a zip member: ich.rawdata) -> (cached image, its table fields);
    raises Rejected: a worker's step per file, and what `input.source: dicom` trains on.

    pydicom's warnings about odd files are silenced: for a bad file its
    rejection reason says what is wrong, once, in rejected.csv.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        header, stored = read_stored(readable(path, max_file_bytes(cfg.max_pixels)), cfg.max_pixels)
        image, quality = process_slice(stored, header, size=cfg.image_size, windows=cfg.windows,
                                       sigmoid=cfg.sigmoid, crop=cfg.crop_border)
    return image, {**_header_fields(header, HEADER_COLUMNS), **quality}


def read_files(files, cfg: PrepareConfig) -> tuple[np.ndarray, pd.DataFrame]:
    """Files -> (their cached images, n x size x size x windows uint8, and one row each): the step
    prepare_data's workers take per chunk, and the in-memory engine (pipeline.engine) per series.

    files: (path or the file's bytes, name, image_id) triples; name is what rejected.csv and the
    study's skipped list say, image_id None means `image_id_for(name, the
    header's SOPInstanceUID)` (prepare_data's rule). Row i's `cache_row` is
    i (prepare_data shifts it to the chunk's place). A rejected file keeps
    a row of zeros and its reason.
    """
    images = np.zeros((len(files), cfg.image_size, cfg.image_size, len(cfg.windows)), np.uint8)
    rows = []
    for i, (path, name, image_id) in enumerate(files):
        row = {"cache_row": i, "file": name, "reason": "", "detail": ""}
        try:
            images[i], fields = read_one(Path(path) if isinstance(path, str) else path, cfg)
            row.update(fields)
        except Rejected as rej:
            row.update(reason=rej.reason, detail=rej.detail[:300])
            if rej.header is not None:  # pixels unusable, header fine: keep where the image sits
                row.update(_header_fields(rej.header, PLACE_COLUMNS))
        except (KeyboardInterrupt, SystemExit, MemoryError):  # out of memory: no reason of the file's
            raise
        except BaseException as exc:  # noqa: BLE001 - one odd file must not end a run of hours
            row.update(reason="unreadable", detail=f"unexpected {type(exc).__name__}: {exc}"[:300])
        row["image_id"] = image_id if image_id is not None else image_id_for(name, row.get("sop_uid"))
        rows.append(row)
    return images, pd.DataFrame(rows)


def decode_files(files, cfg: PrepareConfig) -> tuple[np.ndarray, pd.DataFrame, pd.DataFrame]:
    """Files of whole series -> (images, slices, rejected) as prepare_split makes them, in memory.

    The same reading (read_files), the same sorting out (_sort_out: duplicate
    image IDs, no labels at test time) and the same slice table (series
    order by z, slice_index, n_slices, z_spacing) without a cache on disk;
    `slices.cache_row` indexes `images`. The in-memory engine's workers call
    it per group of series (pipeline.decode), so a test split or a study
    is never written as images.
    """
    images, table = read_files(files, cfg)
    summary = Summary(split="test", clean_dir=Path("."), n_files=len(files))
    usable, rejected = _sort_out(table, None, summary)
    if usable.empty:  # every file rejected: no slice table to order (prepare_split stops there)
        return images, pd.DataFrame(columns=["image_id", "series_id", "slice_index", "cache_row"]), rejected
    return images, _slice_table(usable, None, cfg, summary), rejected


def _process_chunk(refs: list, names: list[str], start: int, clean_dir: str, cfg: PrepareConfig) -> pd.DataFrame:
    """Worker: read, window and cache one chunk of files (refs: paths or zip members); one row per file."""
    images, table = read_files(list(zip(refs, names, [None] * len(names))), cfg)
    table["cache_row"] += start
    if cfg.images:
        cache.write_rows(Path(clean_dir), start, images)  # rows of rejected files: zeros
    return table


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _die_with_parent(parent: int) -> None:
    """Worker initializer: have the kernel SIGKILL this worker when prepare_data dies.

    Without it a kill -9 of prepare_data left its workers alive for good
    (blocked on a pipe, a few hundred MB each). Linux sends the signal when
    the *thread* that forked the worker ends; `_chunk_results` starts every
    worker from the main thread, whose end is the process's end. A parent
    that died before this call can no longer signal: leave at once then.
    """
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:
        os._exit(1)


def _n_workers(n_jobs: int, n_tasks: int) -> int:
    """joblib's convention: -1 = every usable core, -2 = all but one, ..."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    n = n_jobs if n_jobs > 0 else cores + 1 + n_jobs
    return max(1, min(n, n_tasks))


_POOLS: dict[int, ProcessPoolExecutor] = {}  # worker count -> the pool, kept for the process's life


def _pool(n_workers: int) -> ProcessPoolExecutor:
    """A pool of fresh interpreters (spawn: no threads or locks inherited from the parent).

    Starting one costs about a second per worker, so it is kept and reused by
    the next split (as joblib reused its pool); Python shuts it down at exit.
    """
    if n_workers not in _POOLS:
        _drop_pools()
        _POOLS[n_workers] = ProcessPoolExecutor(n_workers, mp_context=multiprocessing.get_context("spawn"),
                                                initializer=_die_with_parent, initargs=(os.getpid(),))
    return _POOLS[n_workers]


def _drop_pools() -> None:
    for pool in _POOLS.values():
        pool.shutdown(wait=False, cancel_futures=True)
    _POOLS.clear()


def _chunk_results(tasks: list[tuple], n_workers: int):
    """Yield _process_chunk(*task) for every task as each finishes (any order).

    Workers are started by the submits below, so from the caller's thread:
    prepare_data's main thread (see _die_with_parent). Nothing keeps a
    finished chunk's result once it is yielded, so the parent's memory does
    not grow with the run. On any way out, chunks not started are cancelled
    and running ones are waited for, so no worker writes into the cache
    after this returns.
    """
    if n_workers == 1:
        for task in tasks:
            yield _process_chunk(*task)
        return
    futures = set()
    try:
        pool = _pool(n_workers)
        futures = {pool.submit(_process_chunk, *task) for task in tasks}
        for future in as_completed(futures):
            futures.discard(future)
            yield future.result()
    except BrokenProcessPool as exc:
        _drop_pools()
        raise PrepareError("a worker process died (killed, or out of memory?); the chunks finished so far are "
                           "kept: rerun the same command to do the rest") from exc
    finally:
        for future in futures:
            future.cancel()
        wait(futures)


def _remove_cache(clean_dir: Path, keep_rejected: bool = False) -> None:
    names = (cache.IMAGES, cache.META, "slices.parquet") + (() if keep_rejected else ("rejected.csv",))
    for name in names:
        (clean_dir / name).unlink(missing_ok=True)
    shutil.rmtree(clean_dir / cache.PARTS, ignore_errors=True)


def _check_existing(clean_dir: Path, key: dict, force: bool) -> None:
    meta = cache.read_meta(clean_dir)
    if meta is None:
        return
    if force:
        _remove_cache(clean_dir)
        return
    if meta != key:
        changed = sorted(k for k in set(meta) | set(key) if meta.get(k) != key.get(k))
        raise PrepareError(
            f"{clean_dir} holds a cache built with different {', '.join(changed)}; "
            "rerun with --force to rebuild it (the old cache will be deleted)"
        )


def _check_caps(cfg: PrepareConfig) -> None:
    """max_pixels is used only here (ich.config checks types; the range is prepare's business)."""
    mp = cfg.max_pixels
    if not isinstance(mp, int) or isinstance(mp, bool) or mp < 64:
        raise PrepareError(f"max_pixels must be an integer >= 64 (an 8 x 8 slice), got {mp!r}")


def prepare_split(raw_dir: Path, clean_dir: Path, split: str, cfg: PrepareConfig, *,
                  force: bool = False, progress: bool = True) -> Summary:
    """Prepare `train` or `test`: see the module docstring and ARCHITECTURE.md, contract 1."""
    t0 = time.time()
    _check_caps(cfg)
    split_dir = TRAIN_DIR if split == "train" else TEST_DIR
    clean_dir = Path(clean_dir)
    try:
        raw = open_raw(raw_dir)  # a folder, or the competition zip read in place
        names = raw.names(split_dir, clean_dir)
        if names is None:
            raise PrepareError(f"no {split_dir}/ folder under RAW_DATA_DIR ({raw_dir}){raw.hint(split_dir)}")
        labels = None
        if split == "train":
            csv = raw.csv(LABELS_CSV)
            if csv is None:
                raise PrepareError(f"label file {LABELS_CSV} not found in RAW_DATA_DIR ({raw_dir})")
            labels = read_labels(csv)  # LabelsError names the bad line; fail before any work
        refs = raw.refs(split_dir, names, clean_dir)
    except RawDataError as exc:
        raise PrepareError(str(exc)) from None
    folder = raw.where(split_dir)
    if not names:
        raise PrepareError(f"{folder} holds no files")
    clean_dir.mkdir(parents=True, exist_ok=True)
    key = {"format": cache.FORMAT_VERSION, **cfg.cache_key(), "n_files": len(names),
           "files_digest": cache.files_digest(names)}
    _check_existing(clean_dir, key, force)
    parts_dir = clean_dir / cache.PARTS
    parts_dir.mkdir(exist_ok=True)
    starts = list(range(0, len(names), cfg.chunk_size))
    todo = [s for s in starts if not (parts_dir / f"chunk_{s:08d}.parquet").exists()]
    if todo and cfg.images:
        try:
            cache.check_free_space(clean_dir, len(names), cfg.image_size, len(cfg.windows))
        except cache.DiskSpaceError as e:
            raise PrepareError(str(e)) from None
    if cache.read_meta(clean_dir) is None:
        if cfg.images:
            cache.create_images(clean_dir, len(names), cfg.image_size, len(cfg.windows))
        cache.write_atomic(clean_dir / cache.META, lambda p: p.write_text(json.dumps(key, indent=1, sort_keys=True)))

    summary = Summary(split=split, clean_dir=clean_dir, n_files=len(names),
                      chunks_done_before=len(starts) - len(todo))
    if todo:
        tasks = [(refs[s:s + cfg.chunk_size], names[s:s + cfg.chunk_size], s, str(clean_dir), cfg) for s in todo]
        bar = tqdm(total=sum(len(t[1]) for t in tasks), unit="img", desc=f"prepare {split}",
                   disable=not progress, smoothing=0.1)
        try:
            for part in _chunk_results(tasks, _n_workers(cfg.n_jobs, len(tasks))):
                start = int(part["cache_row"].iloc[0])
                cache.write_atomic(parts_dir / f"chunk_{start:08d}.parquet", lambda p: part.to_parquet(p, index=False))
                bar.update(len(part))
        except OSError as exc:  # the clean dir's disk or permissions, not the input
            raise PrepareError(f"cannot write the cache in {clean_dir}: {exc}; the chunks finished so far are "
                               "kept: rerun the same command to do the rest") from exc
        finally:
            bar.close()

    table = pd.concat([pd.read_parquet(parts_dir / f"chunk_{s:08d}.parquet") for s in starts], ignore_index=True)
    usable, rejected = _sort_out(table, labels, summary)
    if usable.empty:
        _stop_without_images(clean_dir, folder, rejected, summary)
    slices = _slice_table(usable, labels, cfg, summary)
    cache.write_atomic(clean_dir / "slices.parquet", lambda p: slices.to_parquet(p, index=False))
    cache.write_atomic(clean_dir / "rejected.csv", lambda p: rejected.to_csv(p, index=False))
    summary.seconds = time.time() - t0
    return summary


def _stop_without_images(clean_dir: Path, folder: Path, rejected: pd.DataFrame, summary: Summary) -> None:
    """No file of the split is usable: a one-line error, rejected.csv to say why, and no cache.

    An empty slices.parquet would let train or predict go on with nothing (a
    submission of priors); the image cache of such a run holds only zeros,
    so it is removed rather than left half-made for a later run to trust.
    """
    _remove_cache(clean_dir, keep_rejected=True)
    cache.write_atomic(clean_dir / "rejected.csv", lambda p: rejected.to_csv(p, index=False))
    reasons = ", ".join(f"{k} {v}" for k, v in summary.rejected.items())
    raise PrepareError(f"no usable image among the {summary.n_files} file(s) of {folder} ({reasons}); "
                       f"each file's reason is in {clean_dir / 'rejected.csv'}")


REJECTED_COLUMNS = ["file", "image_id", "reason", "detail", "patient_id", "study_id", "series_id", "z", "sop_uid"]


def _sort_out(table: pd.DataFrame, labels, summary: Summary) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Rows of all files -> (usable rows, rejected table): a second file with an already seen
    image_id, and (train) an image absent from the label csv, join the rejected."""
    for col in ("image_id", *HEADER_COLUMNS, "brain_fraction", "cropped", "fixes"):
        if col not in table:  # every file of the split rejected before its header was read
            table[col] = np.nan
    ok = table[table["reason"] == ""]
    dup = ok.duplicated("image_id", keep="first")
    if dup.any():
        first_file = ok[~dup].set_index("image_id")["file"]
        table.loc[ok.index[dup], "reason"] = "duplicate_id"
        table.loc[ok.index[dup], "detail"] = "same image_id as " + ok.loc[dup, "image_id"].map(first_file)
    ok = ok[~dup]
    if labels is not None:
        has = ok["image_id"].isin(labels.index)
        table.loc[ok.index[~has], ["reason", "detail"]] = ["no_labels", "image_id not in the label csv"]
        ok = ok[has]
        seen = table["image_id"].dropna()  # usable or rejected: the file is there either way
        summary.labels_without_image = int((~labels.index.isin(seen)).sum())
    rejected = table[table["reason"] != ""].reindex(columns=REJECTED_COLUMNS).reset_index(drop=True)
    summary.rejected = rejected["reason"].value_counts().to_dict()
    return ok.drop(columns=["reason", "detail"]), rejected


def _slice_table(ok: pd.DataFrame, labels, cfg: PrepareConfig, summary: Summary) -> pd.DataFrame:
    """Usable rows -> slices.parquet's table (series order, labels, folds); fills the summary."""
    ok = ok.astype({"rows": np.int32, "cols": np.int32})
    if labels is not None:
        ok = ok.join(labels, on="image_id")
    slices = order_slices(ok)
    if labels is not None:
        n_patients = slices["patient_id"].nunique()
        if n_patients < cfg.n_folds:
            raise PrepareError(f"cannot make {cfg.n_folds} patient-grouped folds from {n_patients} usable "
                               f"patient(s): lower n_folds in the prepare config and rerun (decoded chunks are "
                               "kept, so the rerun only rebuilds the table)")
        slices["fold"] = assign_folds(slices, cfg.n_folds, cfg.fold_seed)
    front = ["image_id", "patient_id", "study_id", "series_id", "z", "slice_index", "n_slices", "z_spacing"]
    if labels is not None:
        front += list(LABELS) + ["fold"]
    slices = slices[front + [c for c in slices.columns if c not in front]]
    slices["cache_row"] = slices["cache_row"].astype(np.int64)

    summary.n_images = len(slices)
    summary.n_series = int(slices["series_id"].nunique())
    summary.n_studies = int(slices["study_id"].nunique())
    summary.n_patients = int(slices["patient_id"].nunique())
    if labels is not None:
        summary.positives = {k: int(slices[k].sum()) for k in LABELS}
    fixes = slices["fixes"].str.split().explode().dropna()
    summary.fixes = fixes.value_counts().to_dict()
    differ = slices[slices["image_id"] != slices["sop_uid"]]
    summary.id_mismatch = len(differ)
    if len(differ):
        summary.id_mismatch_example = f"{differ['file'].iloc[0]} holds {differ['sop_uid'].iloc[0]}"
    return slices
