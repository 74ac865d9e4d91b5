"""prepare_data's work: DICOM folder -> slices.parquet, rejected.csv, image cache.

One pass over the files: each worker process takes a chunk of files, reads
each once (header + pixels), windows it into a chunk buffer, writes the
buffer into the cache with one pwrite and returns the header fields. Slice
order, labels and folds are computed afterwards from those fields alone.
Memory stays flat: a worker holds one chunk of small images (chunk_size x
196 KB at 256 px), and the parent holds only table rows.
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from joblib import Parallel, delayed
from tqdm.auto import tqdm

from . import cache
from .config import PrepareConfig
from .dicom import Rejected, read_stored
from .folds import assign_folds
from .image import process_slice
from .labels import LABELS, read_labels
from .series import order_slices

TRAIN_DIR, TEST_DIR = "stage_2_train", "stage_2_test"
LABELS_CSV = "stage_2_train.csv"


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
        if self.labels_without_image:
            out.append(f"  label rows for {self.labels_without_image} images with no file (ignored)")
        out.append(f"  written to {self.clean_dir}")
        return out


def list_files(folder: Path) -> list[str]:
    """Every regular, non-hidden file in the folder, sorted: a stray file is rejected, not skipped."""
    return sorted(p.name for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


HEADER_COLUMNS = ("image_id", "patient_id", "study_id", "series_id", "z", "rows", "cols",
                  "pixel_spacing", "window_center", "window_width")


def _process_chunk(folder: str, names: list[str], start: int, clean_dir: str, cfg: PrepareConfig) -> pd.DataFrame:
    """Worker: read, window and cache one chunk of files; return one row per file."""
    images = np.zeros((len(names), cfg.image_size, cfg.image_size, len(cfg.windows)), np.uint8)
    rows = []
    for i, name in enumerate(names):
        row = {"cache_row": start + i, "file": name, "reason": "", "detail": ""}
        try:
            header, stored = read_stored(Path(folder) / name)
            image, quality = process_slice(stored, header, size=cfg.image_size, windows=cfg.windows,
                                           sigmoid=cfg.sigmoid, crop=cfg.crop_border)
            images[i] = image
            row.update({k: getattr(header, k) for k in HEADER_COLUMNS if k != "z"}, z=header.z, **quality)
        except Rejected as rej:
            row.update(reason=rej.reason, detail=rej.detail[:300])
            if rej.header is not None:  # pixels unusable, header fine: keep where the image sits
                row.update({k: getattr(rej.header, k) for k in ("image_id", "patient_id", "study_id", "series_id")},
                           z=rej.header.z)
        rows.append(row)
    cache.write_rows(Path(clean_dir), start, images)  # rows of rejected files: zeros
    return pd.DataFrame(rows)


def _check_existing(clean_dir: Path, key: dict, force: bool) -> None:
    meta = cache.read_meta(clean_dir)
    if meta is None:
        return
    if force:
        for name in (cache.IMAGES, cache.META, "slices.parquet", "rejected.csv"):
            (clean_dir / name).unlink(missing_ok=True)
        shutil.rmtree(clean_dir / cache.PARTS, ignore_errors=True)
        return
    if meta != key:
        changed = sorted(k for k in set(meta) | set(key) if meta.get(k) != key.get(k))
        raise PrepareError(
            f"{clean_dir} holds a cache built with different {', '.join(changed)}; "
            "rerun with --force to rebuild it (the old cache will be deleted)"
        )


def prepare_split(raw_dir: Path, clean_dir: Path, split: str, cfg: PrepareConfig, *,
                  force: bool = False, progress: bool = True) -> Summary:
    """Prepare `train` or `test`: see the module docstring and DESIGN.md contract 1."""
    t0 = time.time()
    folder = Path(raw_dir) / (TRAIN_DIR if split == "train" else TEST_DIR)
    if not folder.is_dir():
        nested = sorted(Path(raw_dir).glob(f"*/{folder.name}")) if Path(raw_dir).is_dir() else []
        hint = f"; found {nested[0]}: point RAW_DATA_DIR at {nested[0].parent}" if nested else ""
        raise PrepareError(f"no {folder.name}/ folder under RAW_DATA_DIR ({raw_dir}){hint}")
    labels = None
    if split == "train":
        csv = Path(raw_dir) / LABELS_CSV
        if not csv.is_file():
            raise PrepareError(f"label file {csv} not found")
        labels = read_labels(csv)  # LabelsError names the bad line; fail before any work

    names = list_files(folder)
    if not names:
        raise PrepareError(f"{folder} holds no files")
    clean_dir = Path(clean_dir)
    clean_dir.mkdir(parents=True, exist_ok=True)
    key = {"format": cache.FORMAT_VERSION, **cfg.cache_key(), "n_files": len(names),
           "files_digest": cache.files_digest(names)}
    _check_existing(clean_dir, key, force)
    parts_dir = clean_dir / cache.PARTS
    parts_dir.mkdir(exist_ok=True)
    starts = list(range(0, len(names), cfg.chunk_size))
    todo = [s for s in starts if not (parts_dir / f"chunk_{s:08d}.parquet").exists()]
    if todo:
        try:
            cache.check_free_space(clean_dir, len(names), cfg.image_size, len(cfg.windows))
        except cache.DiskSpaceError as e:
            raise PrepareError(str(e)) from None
    if cache.read_meta(clean_dir) is None:
        cache.create_images(clean_dir, len(names), cfg.image_size, len(cfg.windows))
        cache.write_atomic(clean_dir / cache.META, lambda p: p.write_text(json.dumps(key, indent=1, sort_keys=True)))

    summary = Summary(split=split, clean_dir=clean_dir, n_files=len(names),
                      chunks_done_before=len(starts) - len(todo))
    if todo:
        jobs = (delayed(_process_chunk)(str(folder), names[s:s + cfg.chunk_size], s, str(clean_dir), cfg)
                for s in todo)
        bar = tqdm(total=sum(len(names[s:s + cfg.chunk_size]) for s in todo), unit="img",
                   desc=f"prepare {split}", disable=not progress, smoothing=0.1)
        n_jobs = 1 if len(todo) == 1 else cfg.n_jobs
        for part in Parallel(n_jobs=n_jobs, return_as="generator_unordered")(jobs):
            start = int(part["cache_row"].iloc[0])
            cache.write_atomic(parts_dir / f"chunk_{start:08d}.parquet", lambda p: part.to_parquet(p, index=False))
            bar.update(len(part))
        bar.close()

    table = pd.concat([pd.read_parquet(parts_dir / f"chunk_{s:08d}.parquet") for s in starts], ignore_index=True)
    slices, rejected = _finish(table, labels, cfg, summary)
    cache.write_atomic(clean_dir / "slices.parquet", lambda p: slices.to_parquet(p, index=False))
    cache.write_atomic(clean_dir / "rejected.csv", lambda p: rejected.to_csv(p, index=False))
    summary.seconds = time.time() - t0
    return summary


def _finish(table: pd.DataFrame, labels, cfg: PrepareConfig, summary: Summary):
    """Rows of all files -> (slices table, rejected table); fills the summary."""
    for col in (*HEADER_COLUMNS, "z", "brain_fraction", "cropped", "fixes"):
        if col not in table:  # every file of the split rejected before its header was read
            table[col] = np.nan
    ok = table[table["reason"] == ""].copy()
    dup = ok.duplicated("image_id", keep="first")
    table.loc[ok.index[dup], ["reason", "detail"]] = ["duplicate_id", ""]
    table.loc[ok.index[dup], "detail"] = "same SOPInstanceUID as " + ok.loc[dup, "image_id"].map(
        ok[~dup].set_index("image_id")["file"])
    ok = ok[~dup]
    if labels is not None:
        has = ok["image_id"].isin(labels.index)
        table.loc[ok.index[~has], ["reason", "detail"]] = ["no_labels", "image_id not in the label csv"]
        ok = ok[has]
        seen = table["image_id"].dropna()  # usable or rejected: the file is there either way
        summary.labels_without_image = int((~labels.index.isin(seen)).sum())

    ok = ok.drop(columns=["reason", "detail"]).astype({"rows": np.int32, "cols": np.int32})
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

    cols = ["file", "image_id", "reason", "detail", "patient_id", "study_id", "series_id", "z"]
    rejected = table[table["reason"] != ""].reindex(columns=cols).reset_index(drop=True)
    summary.n_images = len(slices)
    summary.n_series = int(slices["series_id"].nunique())
    summary.n_studies = int(slices["study_id"].nunique())
    summary.n_patients = int(slices["patient_id"].nunique())
    if labels is not None:
        summary.positives = {k: int(slices[k].sum()) for k in LABELS}
    summary.rejected = rejected["reason"].value_counts().to_dict()
    fixes = slices["fixes"].str.split().explode().dropna()
    summary.fixes = fixes.value_counts().to_dict()
    return slices, rejected
