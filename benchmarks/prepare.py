#!/usr/bin/env python
"""prepare_data's speed against the bare DICOM decode, in one run, same files and workers.

(a) raw: pydicom.dcmread + pixel_array for every file, in the same worker
    processes and chunks as prepare (the floor any DICOM pipeline pays);
(b) prepare: ich.prepare.prepare_split end to end (read, fix, HU, resize,
    window, write the cache, parquet parts, order, folds, tables).
Target: (b) runs at >= 0.5x the rate of (a). Each is timed `--repeats` times,
alternating, best time kept (page cache warm for both). Usage:

    .venv/bin/python benchmarks/prepare.py [--patients 10] [--jobs 2] [--size 256]
"""
from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

from joblib import Parallel, delayed

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ich.config import PrepareConfig  # noqa: E402
from ich.prepare import list_files, prepare_split  # noqa: E402
from synthetic import generate_dataset  # noqa: E402

FULL_DATA = 752_803 + 121_232


def _decode_chunk(folder: str, names: list[str]) -> int:
    import pydicom
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    for name in names:
        pydicom.dcmread(Path(folder) / name).pixel_array
    return len(names)


def raw_decode(folder: Path, names: list[str], jobs: int, chunk: int) -> float:
    t = time.perf_counter()
    list(Parallel(n_jobs=jobs, return_as="generator_unordered")(
        delayed(_decode_chunk)(str(folder), names[s:s + chunk]) for s in range(0, len(names), chunk)))
    return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patients", type=int, default=10, help="generated train patients (~40 slices per series)")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--size", type=int, default=256, help="cache image size")
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        print(f"generating {args.patients} patients of 512x512 slices ...", flush=True)
        generate_dataset(tmp / "raw", n_train_patients=args.patients, n_test_patients=1, image_size=512,
                         seed=1, n_jobs=args.jobs, n_corrupt=0, progress=False)
        folder = tmp / "raw" / "stage_2_train"
        names = list_files(folder)
        for name in names:  # warm the page cache so both measure CPU, not first disk reads
            (folder / name).read_bytes()
        Parallel(n_jobs=args.jobs)(delayed(abs)(i) for i in range(args.jobs))  # start the workers
        cfg = PrepareConfig(image_size=args.size, n_jobs=args.jobs, chunk_size=args.chunk, n_folds=2)

        raw_t, prep_t = [], []
        for _ in range(args.repeats):
            raw_t.append(raw_decode(folder, names, args.jobs, args.chunk))
            t = time.perf_counter()
            prepare_split(tmp / "raw", tmp / "clean", "train", cfg, force=True, progress=False)
            prep_t.append(time.perf_counter() - t)

    n = len(names)
    raw_rate, prep_rate = n / min(raw_t), n / min(prep_t)
    per_image = args.size * args.size * len(cfg.windows)
    print(f"\nmachine: {platform.machine()}, {platform.processor() or platform.system()}, "
          f"workers: {args.jobs}, images: {n} (512x512 int16), cache {args.size}px x {len(cfg.windows)} windows")
    print(f"(a) dcmread + pixel_array : {raw_rate:8.1f} img/s  ({1000 * min(raw_t) / n:.2f} ms/img wall)")
    print(f"(b) prepare_data          : {prep_rate:8.1f} img/s  ({1000 * min(prep_t) / n:.2f} ms/img wall)")
    print(f"ratio (b)/(a)             : {prep_rate / raw_rate:8.2f}x  (target >= 0.5x)")
    print(f"cache bytes per image     : {per_image:8d}  "
          f"({per_image * FULL_DATA / 1e9:.0f} GB for {FULL_DATA:,} slices)")
    print(f"projected full data here  : {FULL_DATA / prep_rate / 3600:8.2f} h with {args.jobs} workers "
          f"(decode alone {FULL_DATA / raw_rate / 3600:.2f} h)")


if __name__ == "__main__":
    main()
