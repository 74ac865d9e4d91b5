#!/usr/bin/env python
"""The DICOM node: the SR build per slice, the round trip through a real PACS, and the node's memory.

1. The SR build (pipeline.sr.build_sr + sr_bytes) per slice, at 40 and 200 slices, before/after in the
   same run: "before" is highdicom building every slice group and pydicom writing the file (the code
   before the SR was made fast, still there as `copy_groups=False` + pydicom.dcmwrite), "after" is the
   shipped path. Target: <= 5 ms a slice (200 slices <= 1 s).
2. The round trip of a `--slices` study: pushed to Orthanc, sent by Orthanc to the node
   (`/modalities/ich/store`), until its SR is found by QIDO-RS in the source study, minus the node's
   quiet window; the median of `--repeats` studies.
3. The node's resident memory (VmRSS of dicom_node.py) idle after start-up, and the highest seen
   while 4 studies are sent at once.

Needs Orthanc (bash scripts/install_orthanc.sh) and a trained model (the demo's). Usage:

    .venv/bin/python benchmarks/node.py --settings SETTINGS.demo.json --config configs/predict/demo.yaml
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))


def sr_build(n: int, repeats: int = 3) -> tuple[float, float]:
    """(before, after) seconds per slice of building and encoding an SR of n slices; best of `repeats`."""
    import io

    import numpy as np
    import pandas as pd
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    from ich.labels import LABELS
    from pipeline.sr import build_sr, sr_bytes

    src = pydicom.dcmread(get_testdata_file("CT_small.dcm"), stop_before_pixels=True)
    study, series = generate_uid(), generate_uid()
    headers = []
    for _ in range(n):
        h = copy.deepcopy(src)
        h.SOPInstanceUID, h.StudyInstanceUID, h.SeriesInstanceUID = generate_uid(), study, series
        headers.append(h)
    rng = np.random.default_rng(0)
    table = pd.DataFrame({"slice_index": range(n), "z": np.arange(n) * 5.0})
    for label in LABELS:
        table[label] = rng.random(n)
    model = {"experiments": ["demo_cpu"], "folds": {"demo_cpu": 3}, "stage_two": "demo", "oof_score": 0.1}

    def before():
        buf = io.BytesIO()
        pydicom.dcmwrite(buf, build_sr(headers, table, model=model, copy_groups=False), enforce_file_format=True)

    def after():
        sr_bytes(build_sr(headers, table, model=model))

    out = []
    for fn in (before, after):
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        out.append(min(times) / n)
    return out[0], out[1]


def studies(root: Path, n_slices: int, n: int, size: int) -> list[list[Path]]:
    """n generated studies (valid UIDs) of n_slices consecutive slices each."""
    import pydicom

    from synthetic import generate_dataset

    generate_dataset(root, n_train_patients=1, n_test_patients=n + 2, image_size=size, seed=5, n_jobs=1,
                     n_corrupt=0, progress=False, min_slices=n_slices, dicom_uids=True)
    by = {}
    for path in sorted((root / "stage_2_test").glob("*.dcm")):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        by.setdefault(ds.StudyInstanceUID, {}).setdefault(ds.SeriesInstanceUID, []).append(
            (float(ds.ImagePositionPatient[2]), path))
    out = []
    for series in by.values():
        files = [p for _, p in sorted(max(series.values(), key=len))]
        if len(files) >= n_slices:
            out.append(files[:n_slices])
    if len(out) < n:
        sys.exit(f"only {len(out)} generated studies have {n_slices} slices")
    return out[:n]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--settings", default="SETTINGS.demo.json")
    ap.add_argument("--config", default="configs/predict/demo.yaml")
    ap.add_argument("--slices", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=3, help="round trips timed (each its own study)")
    ap.add_argument("--quiet", type=float, default=1.0, help="the node's quiet window (subtracted)")
    ap.add_argument("--size", type=int, default=256, help="generated image size")
    ap.add_argument("--sr-only", action="store_true", help="only the SR build (no Orthanc, no model)")
    args = ap.parse_args()

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; python {platform.python_version()}")
    for n in (40, 200):
        before, after = sr_build(n)
        print(f"SR build + encode, {n} slices: before {before * 1e3:.1f} ms/slice ({before * n:.2f} s), "
              f"after {after * 1e3:.2f} ms/slice ({after * n:.2f} s): {before / after:.1f}x")
    if args.sr_only:
        return

    import pydicom
    from orthanc import MISSING, Node, Orthanc
    if MISSING:
        sys.exit(MISSING)
    settings, config = Path(args.settings).resolve(), Path(args.config).resolve()
    with tempfile.TemporaryDirectory(prefix="ich_node_bench_") as tmp:
        root = Path(tmp)
        data = studies(root / "data", args.slices, args.repeats + 4, args.size)
        orthanc = Orthanc(root)
        node = Node(root, settings, config, orthanc, quiet=args.quiet)
        try:
            t = time.time()
            node.start()
            print(f"node start-up (engine loaded): {time.time() - t:.1f} s")
            time.sleep(2)
            idle = node.rss_mb()
            trips = []
            for files in data[:args.repeats]:
                ids = orthanc.upload(files)
                study = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
                t = time.time()
                orthanc.send(ids)
                found = orthanc.wait_srs(study, 1, timeout=300)
                if not found:
                    sys.exit(f"no SR came back: {node.log()[-2000:]}")
                trips.append(time.time() - t - args.quiet)
            print(f"round trip, {args.slices} slices (Orthanc send -> SR queryable by QIDO-RS) minus the "
                  f"{args.quiet:g} s quiet window: median {statistics.median(trips):.2f} s "
                  f"({', '.join(f'{x:.2f}' for x in trips)})")
            four = data[args.repeats:args.repeats + 4]
            ids = [orthanc.upload(files) for files in four]
            peak, done = [idle], threading.Event()

            def watch():
                while not done.is_set():
                    peak.append(node.rss_mb())
                    time.sleep(0.05)
            watcher = threading.Thread(target=watch)
            watcher.start()
            t = time.time()
            senders = [threading.Thread(target=orthanc.send, args=(i,)) for i in ids]
            for s in senders:
                s.start()
            for s in senders:
                s.join()
            uids = [str(pydicom.dcmread(f[0], stop_before_pixels=True).StudyInstanceUID) for f in four]
            arrived = [bool(orthanc.wait_srs(u, 1, timeout=600)) for u in uids]
            done.set()
            watcher.join()
            print(f"4 studies at once: {sum(arrived)}/4 SRs back in {time.time() - t:.1f} s; node RSS idle "
                  f"{idle:.0f} MB, highest under 4 studies {max(peak):.0f} MB")
        finally:
            if node.proc is not None and node.proc.poll() is None:
                node.stop()
            orthanc.stop()


if __name__ == "__main__":
    main()
