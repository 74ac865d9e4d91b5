"""Generate a synthetic dataset in the exact layout of Kaggle's stage-2 data.

Layout written under ``out_dir``::

    stage_2_train/ID_<hex>.dcm        one file per slice, name = SOPInstanceUID
    stage_2_test/ID_<hex>.dcm
    stage_2_train.csv                 ID,Label long format, with a few duplicated rows
    stage_2_sample_submission.csv     every (test image, label) at 0.5
    stage_2_test_labels.csv           the test truth (not in Kaggle's layout: lets the
                                      demo score its submission)

One series is the unit of work (``render_series``): its phantom is rendered
in chunks of slices, each slice written as soon as it exists, and only the
slice labels travel back, so joblib workers need little memory and the files
do not depend on ``n_jobs``. Corrupt files (like the real ID_6431af929) are
made afterwards by truncating finished files in the middle of their pixel data.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
from joblib import Parallel, delayed
from tqdm.auto import tqdm

from ich.labels import LABELS, SUBTYPES, to_long
from .dicom_writer import dicom_uid, write_ct_slice
from .phantom import HeadPhantom
from .plan import SeriesPlan, plan_dataset

SPLIT_DIRS = {"train": "stage_2_train", "test": "stage_2_test"}
TRAIN_CSV = "stage_2_train.csv"
SAMPLE_SUBMISSION_CSV = "stage_2_sample_submission.csv"
TEST_LABELS_CSV = "stage_2_test_labels.csv"
CHUNK_VOXELS = 1 << 20  # slices rendered together: ~4 MB of float32 per field


def padding_mask(size: int) -> np.ndarray:
    """Pixels outside the scanner's circular field of view (~21 %, as in the real slice)."""
    c = (np.arange(size) - (size - 1) / 2) ** 2
    return c[:, None] + c[None, :] > (size / 2) ** 2


def series_phantom(plan: SeriesPlan) -> tuple[HeadPhantom, np.random.Generator]:
    """The phantom of a series and the generator of its noise, both from the series' seed."""
    anatomy, noise = np.random.SeedSequence([plan.seed, plan.index]).spawn(2)
    head = HeadPhantom(np.random.default_rng(anatomy), size=plan.image_size,
                       pixel_spacing=plan.pixel_spacing, n_slices=plan.n_slices,
                       slice_spacing=plan.slice_spacing, subtypes=plan.subtypes)
    return head, np.random.default_rng(noise)


def render_series(plan: SeriesPlan, folder: Path, dicom_uids: bool = False) -> tuple[list, np.ndarray]:
    """Write every slice of ``plan`` into ``folder``; return (image ids, labels (n, 6) int8).
    dicom_uids: valid UIDs in the headers (synthetic.dicom_writer); the files keep their ID_ names."""
    uid = dicom_uid if dicom_uids else str
    head, noise = series_phantom(plan)
    size, n = plan.image_size, plan.n_slices
    pad = padding_mask(size) if plan.padding else None
    labels = np.zeros((n, len(LABELS)), np.int8)
    chunk = max(1, CHUNK_VOXELS // (size * size))
    for k0 in range(0, n, chunk):
        ks = np.arange(k0, min(n, k0 + chunk))
        hu, masks = head.render(ks, noise)
        for subtype, positive in head.slice_labels(masks, len(ks)).items():
            labels[ks, LABELS.index(subtype)] |= positive
        for i, k in enumerate(ks):
            write_ct_slice(
                folder / f"{plan.sop_ids[k]}.dcm", hu[i], sop_uid=uid(plan.sop_ids[k]), dicom_uids=dicom_uids,
                patient_id=plan.patient_id, study_uid=uid(plan.study_id), series_uid=uid(plan.series_id),
                position=plan.position(int(k)), orientation=plan.orientation,
                pixel_spacing=(plan.pixel_spacing, plan.pixel_spacing),
                window_center=plan.window_center, window_width=plan.window_width,
                rescale_intercept=plan.intercept, bits12_quirk=plan.bits12, padding_mask=pad)
    labels[:, LABELS.index("any")] = labels[:, : len(SUBTYPES)].max(axis=1)
    return list(plan.sop_ids), labels


def truncate_pixel_data(path: Path, pixel_bytes: int) -> None:
    """Cut a finished (uncompressed) file in the middle of its pixel data, which ends the file.

    The header still reads; decoding the pixels fails, as with the real ID_6431af929.
    """
    os.truncate(path, os.path.getsize(path) - pixel_bytes // 2)


def _with_duplicates(long: pd.DataFrame, rng, n_images: int) -> pd.DataFrame:
    """Repeat all six rows of a few images at random places, as the real csv does."""
    if n_images == 0:
        return long
    k = len(LABELS)
    picks = rng.choice(len(long) // k, size=n_images, replace=False)
    blocks = [long.iloc[i * k:(i + 1) * k] for i in sorted(picks)]
    where = sorted(rng.integers(0, len(long) // k + 1, size=n_images))
    parts, start = [], 0
    for w, block in zip(where, blocks):
        parts += [long.iloc[start:w * k], block]
        start = w * k
    parts.append(long.iloc[start:])
    return pd.concat(parts, ignore_index=True)


def _clear(folder: Path) -> None:
    """Drop the .dcm files of an earlier run, which would have no labels in the new csv."""
    folder.mkdir(parents=True, exist_ok=True)
    for p in folder.glob("ID_*.dcm"):
        p.unlink()


def generate_dataset(out_dir, *, n_train_patients=30, n_test_patients=8, image_size=256,
                     seed=0, n_jobs=1, n_corrupt=1, progress=True, min_slices=20, dicom_uids=False) -> dict:
    """Write a synthetic stage-2 dataset under ``out_dir``; return a summary dict.

    Same arguments -> byte-identical files, whatever ``n_jobs``. Earlier
    ``ID_*.dcm`` files in ``stage_2_train/`` and ``stage_2_test/`` are removed.
    dicom_uids: headers a PACS accepts (valid UIDs, SOPClassUID; synthetic.dicom_writer) instead of
    Kaggle's ``ID_`` ones; the files and the label CSV keep the ``ID_`` names, so such a dataset is for
    sending to a PACS or the DICOM node, not for prepare_data (which names images by SOPInstanceUID).
    """
    t0 = time.perf_counter()
    if image_size < 32:
        raise ValueError(f"image_size must be >= 32, got {image_size}")
    out = Path(out_dir)
    folders = {split: out / name for split, name in SPLIT_DIRS.items()}
    for folder in folders.values():
        _clear(folder)
    if min_slices < 3:
        raise ValueError(f"min_slices must be >= 3, got {min_slices}")
    plans = plan_dataset(n_train_patients=n_train_patients, n_test_patients=n_test_patients,
                         image_size=image_size, seed=seed, min_slices=min_slices)
    jobs = (delayed(render_series)(p, folders[p.split], dicom_uids) for p in plans)
    results = Parallel(n_jobs=n_jobs, return_as="generator")(jobs)
    tables = {"train": [], "test": []}
    for plan, (ids, labels) in zip(plans, tqdm(results, total=len(plans), desc="series",
                                               unit="series", disable=not progress)):
        tables[plan.split].append(pd.DataFrame(labels, index=pd.Index(ids, name="image_id"),
                                               columns=list(LABELS)))
    wide = {split: (pd.concat(t).sort_index() if t else
                    pd.DataFrame(columns=list(LABELS), index=pd.Index([], name="image_id"), dtype=np.int8))
            for split, t in tables.items()}

    rng = np.random.default_rng([seed, 0xC5F])
    n_corrupt = min(int(n_corrupt), len(wide["train"]))
    corrupt = sorted(rng.choice(wide["train"].index.to_numpy(), size=n_corrupt, replace=False)) if n_corrupt else []
    for image_id in corrupt:
        truncate_pixel_data(folders["train"] / f"{image_id}.dcm", image_size * image_size * 2)

    n_dup = max(1, len(wide["train"]) // 500) if len(wide["train"]) else 0
    _with_duplicates(to_long(wide["train"]), rng, n_dup).to_csv(out / TRAIN_CSV, index=False)
    to_long(wide["test"]).to_csv(out / TEST_LABELS_CSV, index=False)
    sample = to_long(wide["test"])
    sample["Label"] = 0.5
    sample.to_csv(out / SAMPLE_SUBMISSION_CSV, index=False)

    train = wide["train"]
    return {
        "out_dir": str(out),
        "patients": len({p.patient_id for p in plans}),
        "train_patients": len({p.patient_id for p in plans if p.split == "train"}),
        "test_patients": len({p.patient_id for p in plans if p.split == "test"}),
        "studies": len({p.study_id for p in plans}),
        "series": len(plans),
        "train_images": len(train),
        "test_images": len(wide["test"]),
        "positives": {c: int(train[c].sum()) for c in LABELS},
        "prevalence": {c: float(train[c].mean()) if len(train) else 0.0 for c in LABELS},
        "bits12_files": sum(p.n_slices for p in plans if p.bits12),
        "corrupt_files": len(corrupt),
        "corrupt_ids": list(corrupt),
        "duplicate_rows": n_dup * len(LABELS),
        "seconds": round(time.perf_counter() - t0, 2),
    }
