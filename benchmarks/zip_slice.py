#!/usr/bin/env python
"""Where one slice's time goes on the zip road, piece by piece, in one process (one loader worker).

On generated files deflated as Kaggle's zip deflates them, each piece timed
over all files, best of --repeats, the pieces alternating (the same machine for all):
inflating the member (ISA-L, and zlib for reference), its CRC, the read of
header and pixels (ich.dicom.read_stored: the pixels a view of the inflated
bytes) against pydicom's full read of the same bytes (the pixel element
copied out, the road before the in-place read) and bare `dcmread` +
`pixel_array`, then `process_slice` at the 512-px settings
(configs/prepare/512.yaml: three windows, cropped to the head) and with one
window (what adjacent mode computes). benchmarks/loader.py measures the
whole loader items. Usage:

    .venv/bin/python benchmarks/zip_slice.py [--patients 1] [--repeats 7] [--file-size 512]
"""
from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ich import dicom  # noqa: E402
from ich.config import load_prepare_config  # noqa: E402
from ich.image import process_slice  # noqa: E402
from synthetic import generate_dataset  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def best_ms(fn, n: int, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return 1000 * best / n


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patients", type=int, default=1, help="generated train patients (~40 slices a series)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--file-size", type=int, default=512, help="generated slices' rows and columns (the real: 512)")
    args = ap.parse_args()
    import cv2
    import pydicom
    from isal import isal_zlib
    cv2.setNumThreads(1)
    cfg = load_prepare_config(REPO / "configs" / "prepare" / "512.yaml")
    with tempfile.TemporaryDirectory() as tmp:
        generate_dataset(Path(tmp) / "raw", n_train_patients=args.patients, n_test_patients=0,
                         image_size=args.file_size, seed=1, n_jobs=1, n_corrupt=0, progress=False)
        raw = [p.read_bytes() for p in sorted((Path(tmp) / "raw" / "stage_2_train").iterdir())]
    packed = []
    for data in raw:
        z = zlib.compressobj(6, zlib.DEFLATED, -15)  # as zipfile's ZIP_DEFLATED writes a member
        packed.append(z.compress(data) + z.flush())
    inflated = [isal_zlib.decompressobj(-15).decompress(c) for c in packed]
    assert inflated == raw
    full = lambda b: dicom._read_stored_pydicom(b, len(b), dicom.MAX_PIXELS)  # noqa: E731
    read = [dicom.read_stored(b) for b in inflated]
    one = cfg.windows[:1]
    n, r = len(raw), args.repeats
    pieces = {
        "inflate (ISA-L)": lambda: [isal_zlib.decompressobj(-15).decompress(c) for c in packed],
        "inflate (zlib)": lambda: [zlib.decompressobj(-15).decompress(c) for c in packed],
        "CRC (ISA-L)": lambda: [isal_zlib.crc32(b) for b in inflated],
        "read_stored (pixels in place)": lambda: [dicom.read_stored(b) for b in inflated],
        "pydicom's full read (pixels copied)": lambda: [full(b) for b in inflated],
        "bare dcmread + pixel_array": lambda: [pydicom.dcmread(io.BytesIO(b)).pixel_array for b in inflated],
        f"process_slice, {len(cfg.windows)} windows": lambda: [
            process_slice(s, h, size=cfg.image_size, windows=cfg.windows, sigmoid=cfg.sigmoid, crop=cfg.crop_border)
            for h, s in read],
        "process_slice, 1 window": lambda: [
            process_slice(s, h, size=cfg.image_size, windows=one, sigmoid=cfg.sigmoid, crop=cfg.crop_border)
            for h, s in read],
    }
    times = dict.fromkeys(pieces, float("inf"))
    for _ in range(r):  # alternate: every piece sees the same machine
        for name, fn in pieces.items():
            times[name] = min(times[name], best_ms(fn, n, 1))
    load = os.getloadavg()
    print(f"{n} generated {args.file_size}x{args.file_size} slices, best of {r}; load average {load[0]:.1f} / "
          f"{load[1]:.1f} / {load[2]:.1f} at the end")
    for name, ms in times.items():
        print(f"{name:40s} {ms:7.3f} ms")
    ratio = times["pydicom's full read (pixels copied)"] / times["read_stored (pixels in place)"]
    print(f"the read in place against the full read: {ratio:.2f}x faster")


if __name__ == "__main__":
    main()
