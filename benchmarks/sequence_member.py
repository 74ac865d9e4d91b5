#!/usr/bin/env python
"""Stage two's sequence member: seconds per training epoch, to size it for the competition's data.

Generated inputs (no labels that mean anything): --series series of --length
slices with --inputs inputs each, one epoch of stacking.sequence's training
step (padded batches, AdamW, the weighted loss) per (batch, hidden) setting,
on --threads torch threads. At the competition's size each of the 5 members
trains on about 15,000 series per epoch.

    .venv/bin/python benchmarks/sequence_member.py [--series 1200] [--length 40] [--threads 1]

With --fit ROWS: the whole member instead, stacking.sequence.fit_predict end to end (5 folds in
lockstep, per-epoch validation, OOF and nested predictions, 5 fold models' test predictions) on
ROWS generated train slices (series of 20-60) and ROWS/6.2 test slices, --inputs inputs, once per
--variant (sequence settings as the config writes them, over stacking.config.DEFAULT_SEQUENCE), each in
a fresh child process: wall and CPU seconds and the child's peak RSS, which holds only the member and
its inputs (the competition's size: --fit 752803). The labels are runs of slices the first 6 inputs
see through noise, so training is training, but the epochs are what the variant fixes: give
`schedule=cosine` and `epochs` to time a given number of epochs.

    .venv/bin/python benchmarks/sequence_member.py --fit 752803 --threads 2 \
        --variant today:schedule=cosine,epochs=12 --variant new:schedule=cosine,epochs=6,crop=24
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stacking import sequence  # noqa: E402


def generated(n_rows: int, n_inputs: int, seed: int):
    """Slices in series of 20-60 (5 folds of series), labels as runs, inputs: noisy logits of the labels
    and noise."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(20, 61, size=max(1, n_rows // 40))
    lengths[-1] += n_rows - lengths.sum()
    lengths = lengths[lengths > 0]
    series = np.repeat(np.arange(len(lengths)), lengths)
    index = np.concatenate([np.arange(n) for n in lengths])
    slices = pd.DataFrame({"series_id": series, "slice_index": index})
    start = rng.uniform(0, 0.7, (len(lengths), 6)) * lengths[:, None]
    stop = start + rng.uniform(0.1, 0.3, (len(lengths), 6)) * lengths[:, None]
    pos = rng.random((len(lengths), 6)) < 0.15
    y = (pos[series] & (index[:, None] >= start[series]) & (index[:, None] < stop[series])).astype(np.float32)
    y[:, 5] = y[:, :5].max(axis=1)
    X = rng.normal(size=(len(slices), n_inputs)).astype(np.float32)
    X[:, :6] = 4 * y - 2 + 2 * X[:, :6]
    return slices, X, y, (series % 5).astype(np.int64)


def fit_child(args) -> dict:
    from stacking.config import DEFAULT_SEQUENCE
    params = {**DEFAULT_SEQUENCE, "device": "cpu", "num_threads": args.threads, **json.loads(args.params)}
    slices, X, y, folds = generated(args.fit, args.inputs, 0)
    t_slices, t_X, _, _ = generated(round(args.fit / 6.2), args.inputs, 1)
    base = np.full(y.shape, 0.1)
    tests = {k: (t_slices, t_X, np.full((len(t_X), 6), 0.1)) for k in range(5)}
    rss_inputs = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    t0, c0 = time.perf_counter(), time.process_time()
    res = sequence.fit_predict(slices, X, y, folds, base, tests, params, progress=False)
    return {"wall": time.perf_counter() - t0, "cpu": time.process_time() - c0, "inputs_gb": rss_inputs,
            "peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20,
            "epochs": [int(res.epochs[k]) for k in sorted(res.epochs)], "rows": len(X), "test_rows": len(t_X),
            "valid": float(res.curves[:, -1].mean())}


def fit_main(args) -> None:
    print(f"stacking.sequence.fit_predict on {args.fit:,} generated train slices (+ test), {args.inputs} inputs, "
          f"{args.threads} thread(s), each variant in a fresh process; load average before: "
          f"{' '.join(open('/proc/loadavg').read().split()[:3])}")
    print(f"{'variant':>10s} {'wall s':>8s} {'CPU s':>8s} {'inputs GB':>9s} {'peak GB':>8s}  epochs  settings")
    first = None
    for text in args.variant or ["default:"]:
        name, _, pairs = text.partition(":")
        params = {k: __import__("yaml").safe_load(v) for k, _, v in
                  (p.partition("=") for p in pairs.split(",") if p)}
        cmd = [sys.executable, __file__, "--fit", str(args.fit), "--inputs", str(args.inputs),
               "--threads", str(args.threads), "--params", json.dumps(params), "--child"]
        out = subprocess.run(cmd, capture_output=True, text=True, check=False)
        line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
        if out.returncode or not line:
            sys.exit(f"{name}: child failed (exit {out.returncode})\n{out.stdout[-2000:]}{out.stderr[-3000:]}")
        r = json.loads(line[-1][7:])
        first = first or r
        print(f"{name:>10s} {r['wall']:8.1f} {r['cpu']:8.1f} {r['inputs_gb']:9.2f} {r['peak_gb']:8.2f}  "
              f"{r['epochs']}  {params}  (x{first['wall'] / r['wall']:.2f} wall, x{first['cpu'] / r['cpu']:.2f} CPU against the first)", flush=True)
    print(f"load average after: {' '.join(open('/proc/loadavg').read().split()[:3])}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--series", type=int, default=1200)
    ap.add_argument("--length", type=int, default=40, help="slices per series (real: 20-60)")
    ap.add_argument("--inputs", type=int, default=30, help="per-slice inputs (two experiments with PCA 8: 35)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--settings", default="32x64,64x64,128x64,64x32", help="batch x hidden, comma-separated")
    ap.add_argument("--fit", type=int, default=0, help="time the whole member on this many train slices")
    ap.add_argument("--variant", action="append", default=None, metavar="NAME:KEY=VALUE,...",
                    help="with --fit: sequence settings (repeatable)")
    ap.add_argument("--params", default="{}", help=argparse.SUPPRESS)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.fit and args.child:
        print("RESULT " + json.dumps(fit_child(args)), flush=True)
        return
    if args.fit:
        return fit_main(args)
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
