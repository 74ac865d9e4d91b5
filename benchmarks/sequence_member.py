#!/usr/bin/env python
"""Stage two's sequence member: seconds per training epoch, to size it for the competition's data.

Generated inputs (no labels that mean anything): --series series of --length
slices with --inputs inputs each, one epoch of stacking.sequence's training
step (padded batches, AdamW, the weighted loss) per (batch, hidden) setting,
on --threads torch threads. At the competition's size each of the 5 members
trains on about 15,000 series per epoch.

    .venv/bin/python benchmarks/sequence_member.py [--series 1200] [--length 40] [--threads 1]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stacking import sequence  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--series", type=int, default=1200)
    ap.add_argument("--length", type=int, default=40, help="slices per series (real: 20-60)")
    ap.add_argument("--inputs", type=int, default=30, help="per-slice inputs (two experiments with PCA 8: 35)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--settings", default="32x64,64x64,128x64,64x32", help="batch x hidden, comma-separated")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    lengths = rng.integers(max(3, args.length - 20), args.length + 21, size=args.series)
    slices = pd.DataFrame({"series_id": np.repeat(np.arange(args.series), lengths),
                           "slice_index": np.concatenate([np.arange(n) for n in lengths])})
    X = rng.normal(size=(len(slices), args.inputs)).astype(np.float32)
    y = (rng.random((len(slices), 6)) < 0.1).astype(np.float32)
    series = sequence.Series.of(slices)
    print(f"{args.series} series of {lengths.min()}-{lengths.max()} slices ({len(slices):,} rows), "
          f"{args.inputs} inputs, {args.threads} thread(s)")
    for setting in args.settings.split(","):
        batch, hidden = (int(v) for v in setting.split("x"))
        torch.manual_seed(0)
        net = sequence.SeriesNet(args.inputs, hidden)
        data = sequence._Data(X, None, y, torch.device("cpu"))
        opt = torch.optim.AdamW(net.parameters(), 1e-3)
        t = time.perf_counter()
        for which in series.batches(batch, np.random.default_rng(0)):
            out, rows, mask = data.logits(net, series, which)
            loss = sequence._loss(out, data.y[rows], mask)
            opt.zero_grad()
            loss.backward()
            opt.step()
        dt = time.perf_counter() - t
        print(f"  batch {batch:4d} hidden {hidden:4d}: {dt:6.2f} s per epoch, "
              f"{1000 * dt / args.series:6.2f} ms per series")


if __name__ == "__main__":
    main()
