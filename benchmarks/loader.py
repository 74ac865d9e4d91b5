#!/usr/bin/env python
"""Stage one's loader straight from the DICOMs (input.source: dicom), against the bare decode, in one run.

On the same generated 512 x 512 files, in one process (what one DataLoader
worker does; OpenCV on one thread, as models.data sets it):
(a) baseline: bare `pydicom.dcmread(file).pixel_array` per file;
(z) the zip road's own bare decode, on the same files as members of the
    zip: the standard library's `ZipFile.read` (one open handle, zlib, CRC)
    + `dcmread` of the bytes + `pixel_array`; printed too with the loader's
    member read (ISA-L's inflate) in place of zipfile's;
(b) the training loader's item from the DICOM folder: SliceDataset over
    ich.dicom_rows.DicomRows (prepare_data's read_one: header checks, HU,
    windows, resize to the 512-px image settings of configs/prepare/512.yaml),
    the experiment's shrink to the output size, the default augmentations,
    the tensor; in `windows` and `adjacent` mode (adjacent decodes 3 files);
(c) the same from the competition-like zip (deflated members read by offset,
    CRC checked: ich.rawdata), and without augmentations (the decode and
    windowing alone: augmentations cost the cache road as much);
(d) for reference, the same items from a 512-px image cache (images.npy, the
    cache road), with and without augmentations, and the decode alone
    (DicomRows[row]: one file, no shrink, no augmentation) from the folder
    and the zip;
(e) before/after: the folder's and the zip's decode and items with every file
    through pydicom's full read (ich.dicom without its in-place road: the
    pixel element copied out of the file's bytes), against today's;
at output sizes 256, 384 and 512. Items are drawn at random, as the sampler
does; each rate is the best of --repeats, alternating.
Also measured: reading the zip members alone, inflated by ISA-L (isal) and by
zipfile's zlib; prepare_data without images (prepare config `images: false`)
per 1,000 slices, and the zip's size against the files'.
Printed: per-worker items/s, the ratios to (a) and (z), and the workers each
default experiment needs at every size of its schedule to feed the GPU rates
measured on one H200 (BENCHMARKS.md, train.py's loop). Targets: the zip's
decode >= 0.6x the bare decode per worker (one file, the files' own 512 px;
printed against (a) and against (z)); every default experiment fed by <= 14
workers at every size. Usage:

    .venv/bin/python benchmarks/loader.py [--patients 4] [--items 150] [--repeats 3]
"""
from __future__ import annotations

import argparse
import contextlib
import io
import math
import os
import platform
import random
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ich.config import PrepareConfig  # noqa: E402
from ich.dicom_rows import open_rows  # noqa: E402
from ich.prepare import prepare_split  # noqa: E402
from models.augment import build_train_transform  # noqa: E402
from models.config import AugmentCfg, load_experiment  # noqa: E402
from models.data import SliceDataset  # noqa: E402
from models.experiment import load_train_table  # noqa: E402
from synthetic import generate_dataset  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULTS = ("seresnext50_512", "resnext50_512", "resnext101_512")
# train.py's loop on one H200 (BENCHMARKS.md "Stage one on a GPU"): (size, img/s) measured per backbone;
# other sizes scaled by pixels, as the configs' headers project them
GPU_RATES = {"seresnext50_32x4d": (256, 3075.0), "resnext50_32x4d": (512, 837.0),
             "resnext101_32x4d": (512, 509.0)}  # the last scaled by timm's throughput table, not measured
SIZES = (256, 384, 512)
MODES = ("windows", "adjacent")


def gpu_rate(backbone: str, size: int) -> float:
    ref, rate = GPU_RATES.get(backbone, GPU_RATES["seresnext50_32x4d"])
    return rate * (ref / size) ** 2


def bare(paths: list[Path]) -> None:
    import pydicom
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    for p in paths:
        pydicom.dcmread(p).pixel_array


def bare_zip(archive: zipfile.ZipFile, members) -> None:
    """The zip road's own bare decode: the standard library reads the member (zlib, CRC), pydicom decodes it."""
    import pydicom
    for m in members:
        pydicom.dcmread(io.BytesIO(archive.read(m.name))).pixel_array


def bare_member(members) -> None:
    """The same with the loader's member read (ISA-L's inflate, CRC; ich.rawdata.Member.read)."""
    import pydicom
    for m in members:
        pydicom.dcmread(io.BytesIO(m.read(1 << 30))).pixel_array


@contextlib.contextmanager
def full_read(on: bool):
    """read_stored without its in-place road (every file through pydicom's full read): the before."""
    from ich import dicom
    saved = dicom._read_in_place
    if on:
        dicom._read_in_place = lambda *args: None
    try:
        yield
    finally:
        dicom._read_in_place = saved


def items(dataset: SliceDataset, picks: list[int]) -> None:
    for i in picks:
        dataset[i]


def best_rate(fn, n: int, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return n / min(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patients", type=int, default=4, help="generated train patients (~40 slices a series)")
    ap.add_argument("--items", type=int, default=150, help="items per measurement")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--file-size", type=int, default=512, help="generated slices' rows and columns (the real: 512)")
    args = ap.parse_args()
    import cv2
    cv2.setNumThreads(1)
    rng = random.Random(0)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        print(f"generating {args.patients} patients of {args.file_size}x{args.file_size} slices ...", flush=True)
        generate_dataset(tmp / "raw", n_train_patients=args.patients, n_test_patients=1, image_size=args.file_size,
                         seed=1,
                         n_jobs=2, n_corrupt=0, progress=False)
        folder = tmp / "raw" / "stage_2_train"
        files = sorted(folder.iterdir())
        with zipfile.ZipFile(tmp / "data.zip", "w", zipfile.ZIP_DEFLATED) as z:  # as Kaggle's download
            for p in sorted((tmp / "raw").rglob("*")):
                if p.is_file():
                    z.write(p, "rsna-intracranial-hemorrhage-detection/" + p.relative_to(tmp / "raw").as_posix())
        dcm_bytes = sum(p.stat().st_size for p in files)
        zinfos = [i for i in zipfile.ZipFile(tmp / "data.zip").infolist() if "/stage_2_train/" in i.filename]
        zip_bytes = sum(i.compress_size for i in zinfos)
        for p in files:  # page cache warm for every road
            p.read_bytes()
        (tmp / "data.zip").read_bytes()

        prepare_split(tmp / "raw", tmp / "cache", "train", PrepareConfig(image_size=512, n_folds=2, n_jobs=1),
                      progress=False)
        cfg = PrepareConfig(image_size=512, n_folds=2, n_jobs=1, images=False)
        t = time.perf_counter()
        summary = prepare_split(tmp / "raw", tmp / "clean", "train", cfg, progress=False)
        prep_s = time.perf_counter() - t
        t = time.perf_counter()
        prepare_split(tmp / "data.zip", tmp / "clean_zip", "train", cfg, progress=False)
        prep_zip_s = time.perf_counter() - t
        slices = load_train_table(tmp / "clean")
        rows = {"cache": None, "folder": open_rows(tmp / "clean", tmp / "raw", slices),
                "zip": open_rows(tmp / "clean_zip", tmp / "data.zip", slices)}
        cache_rows = slices["cache_row"].to_numpy()
        picks = [rng.randrange(len(slices)) for _ in range(args.items)]
        base_paths = [folder / slices["file"].iloc[i] for i in picks]
        transform = build_train_transform(AugmentCfg())

        from ich import rawdata
        members = [rows["zip"].ref(int(r)) for r in slices["cache_row"].to_numpy()[picks]]
        inflate = {}
        for name, lib in (("isal", rawdata.fast_zlib), ("zlib", None)):
            if name == "isal" and lib is None:
                continue
            saved, rawdata.fast_zlib = rawdata.fast_zlib, lib
            inflate[name] = best_rate(lambda: [m.read(1 << 30) for m in members], len(members), args.repeats)
            rawdata.fast_zlib = saved
        rates, base, base_zip, base_isal = {}, [], [], []
        archive = zipfile.ZipFile(tmp / "data.zip")  # a worker's own open handle, as the loader keeps one
        for _ in range(args.repeats):  # alternate: the baselines and the loaders see the same machine
            base.append(best_rate(lambda: bare(base_paths), len(picks), 1))
            base_zip.append(best_rate(lambda: bare_zip(archive, members), len(picks), 1))
            base_isal.append(best_rate(lambda: bare_member(members), len(picks), 1))
            for road, images in rows.items():
                variants = [(road, transform, True)]
                if images is None or road == "zip":
                    variants.append((f"{road}, no augmentation", None, True))
                if images is not None:
                    variants.append((f"{road}, pydicom's full read", transform, False))
                for label, tf, in_place in variants:
                    with full_read(not in_place):
                        if images is not None and tf is transform:
                            key = (label, "decode alone", 512)
                            decode = lambda: [images[cache_rows[i]] for i in picks]  # noqa: E731
                            rates[key] = max(rates.get(key, 0.0), best_rate(decode, len(picks), 1))
                        for mode in MODES:
                            for size in SIZES if in_place and tf is transform else (256, 512):
                                data = SliceDataset(slices, tmp / "cache", mode=mode, size=size, transform=tf,
                                                    images=images)
                                key = (label, mode, size)
                                rates[key] = max(rates.get(key, 0.0),
                                                 best_rate(lambda: items(data, picks), len(picks), 1))
        archive.close()
        base_rate, zip_rate, isal_rate = max(base), max(base_zip), max(base_isal)

    n = summary.n_files
    load = os.getloadavg()
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} cores, load average {load[0]:.1f} / {load[1]:.1f} / "
          f"{load[2]:.1f} (1 / 5 / 15 min) at the end; {n} files of {args.file_size}x{args.file_size} int16, "
          f"{args.items} random items per measurement, best of {args.repeats}")
    print(f"(a) bare dcmread + pixel_array: {base_rate:7.1f} slices/s per worker")
    print(f"(z) bare zip read (zipfile) + dcmread + pixel_array: {zip_rate:7.1f} slices/s per worker "
          f"({zip_rate / base_rate:.2f}x (a)); with ISA-L's inflate (the loader's member read): {isal_rate:7.1f} "
          f"({isal_rate / base_rate:.2f}x (a))")
    print(f"zip: {zip_bytes / dcm_bytes:.2f} of the files' bytes (deflate, generated data); members read alone: "
          + ", ".join(f"{k} {1000 / v:.2f} ms ({v:,.0f}/s)" for k, v in inflate.items())
          + f", bare decode {1000 / base_rate:.2f} ms")
    print(f"prepare without images: {1000 * prep_s / n:.2f} s per 1,000 slices from the folder, "
          f"{1000 * prep_zip_s / n:.2f} s from the zip (1 worker, 512-px image settings)\n")
    print("| road | mode | output px | items/s per worker | vs (a) | vs (z) |")
    print("|---|---|---|---|---|---|")
    for (road, mode, size), r in rates.items():
        print(f"| {road} | {mode} | {size} | {r:,.1f} | {r / base_rate:.2f}x | {r / zip_rate:.2f}x |")
    print("\nreading in place against pydicom's full read (after / before, same run):")
    for road in ("folder", "zip"):
        for mode, size in (("decode alone", 512), ("windows", 256), ("adjacent", 256), ("windows", 512)):
            before = rates.get((f"{road}, pydicom's full read", mode, size))
            if before:
                print(f"  {road} {mode} {size}: {rates[road, mode, size] / before:.2f}x")
    print("\nworkers needed from the zip to feed the H200 rates (ceil(GPU img/s / items/s per worker)):")
    print("| experiment | mode | size | GPU img/s | workers |")
    print("|---|---|---|---|---|")
    worst = 0
    for name in DEFAULTS:
        exp = load_experiment(REPO / "configs" / f"{name}.yaml")
        sizes = sorted({int(s) for s, _ in exp.input.progressive or []} | {exp.final_size})
        for size in sizes:
            size_key = min(SIZES, key=lambda s: abs(s - size))
            per_worker = rates["zip", exp.input.mode if exp.input.mode in MODES else "windows", size_key]
            gpu = gpu_rate(exp.model.backbone, size)
            need = math.ceil(gpu / per_worker)
            worst = max(worst, need)
            print(f"| {name} | {exp.input.mode} | {size} | {gpu:,.0f} | {need} |")
    decode = rates["zip", "decode alone", 512]
    print(f"\ntargets: zip decode (512) {decode / base_rate:.2f}x bare decode (a) (>= 0.6x: "
          f"{'met' if decode / base_rate >= 0.6 else 'NOT met'}), {decode / zip_rate:.2f}x the zip's own bare "
          f"decode (z) ({'met' if decode / zip_rate >= 0.6 else 'NOT met'}); most workers any default size needs: "
          f"{worst} (<= 14: {'met' if worst <= 14 else 'NOT met'})")


if __name__ == "__main__":
    main()
