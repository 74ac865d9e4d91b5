#!/usr/bin/env python
"""Stage-one test inference rate: images per second of the code predict.py runs.

For each backbone: a fold checkpoint saved the way models/trainer.py saves
it (state dict + config; random weights), loaded back with
models.predict_split.load_fold_model, then models.inference.predict over a
prepared (generated) test set through the real dataset and DataLoader
(make_dataset + make_loader: cache read, resize, uint8 batches), probabilities
and pooled embeddings as predict_test keeps them. Timed with and without
horizontal-flip TTA (TTA = two forward passes per image; the rate counts
images, not passes), after one untimed warm-up pass, plus the loader alone.
On CUDA the runtime is predict.py's: AMP (bf16 by default) and channels_last.
Usage:

    .venv/bin/python benchmarks/predict.py [--backbones test_resnet,resnet18] [--size 128]
        [--batch 64] [--workers 1] [--images 512] [--amp bf16] [--threads 0]

It prints img/s and the projected time of the 121,232 stage-2 test slices
per fold model and for 5 folds x 2 experiments (configs/predict/default.yaml).
"""
from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ich.config import PrepareConfig  # noqa: E402
from ich.prepare import prepare_split  # noqa: E402
from ich.synthetic import generate_dataset  # noqa: E402
from models import runtime as rt  # noqa: E402
from models.config import from_dict  # noqa: E402
from models.data import with_neighbors  # noqa: E402
from models.inference import make_loader, predict  # noqa: E402
from models.net import SliceNet  # noqa: E402
from models.predict_split import load_fold_model  # noqa: E402
from models.trainer import make_dataset  # noqa: E402

N_TEST = 121_232
FOLDS, EXPERIMENTS = 5, 2


def sync(runtime):
    if runtime.device.type == "cuda":
        torch.cuda.synchronize()


def save_checkpoint(path: Path, backbone: str, args) -> None:
    """As models/trainer.py writes fold{k}.pt: weights + the experiment config (+ bookkeeping)."""
    cfg = from_dict({"name": f"bench_{backbone}", "model": {"backbone": backbone},
                     "input": {"mode": args.mode, "size": args.size},
                     "train": {"batch_size": args.batch, "num_workers": args.workers, "amp": args.amp,
                               "channels_last": not args.no_channels_last, "epochs": 1}})
    model = SliceNet(backbone, None, cfg.model.dropout)
    torch.save({"state_dict": model.state_dict(), "config": cfg.to_dict(), "fold": 0, "epoch": 1,
                "val_wlogloss": 0.0}, path)


def fmt_time(seconds: float) -> str:
    return f"{seconds / 3600:.2f} h" if seconds >= 5400 else f"{seconds / 60:.1f} min"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbones", default="test_resnet,resnet18", help="comma-separated timm names")
    ap.add_argument("--size", type=int, default=128, help="model input size (= the cache size unless --cache-size)")
    ap.add_argument("--cache-size", type=int, default=0, help="image cache size (0: --size, no resize)")
    ap.add_argument("--mode", default="windows", choices=["windows", "adjacent"])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--workers", type=int, default=1, help="DataLoader workers")
    ap.add_argument("--images", type=int, default=512, help="test images per timed pass")
    ap.add_argument("--patients", type=int, default=4, help="generated test patients (about 50 slices each)")
    ap.add_argument("--amp", default="bf16", choices=["auto", "bf16", "fp16", "none"], help="CUDA only")
    ap.add_argument("--no-channels-last", action="store_true", help="CUDA only")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cache_size = args.cache_size or args.size
    runtime = rt.setup(args.amp, not args.no_channels_last)
    if runtime.device.type == "cuda":
        dev = f"{torch.cuda.get_device_name()} (CUDA), amp {runtime.amp_dtype}, channels_last {runtime.channels_last}"
    else:
        dev = f"CPU ({platform.machine()}, {torch.get_num_threads()} torch threads), fp32"

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_predict_") as tmp:
        tmp = Path(tmp)
        print(f"generating and preparing {args.patients} test patients at {cache_size} px ...", flush=True)
        generate_dataset(tmp / "raw", n_train_patients=1, n_test_patients=args.patients,
                         image_size=max(256, cache_size), seed=5, n_jobs=2, progress=False)
        test_dir = tmp / "clean" / "test"
        prepare_split(tmp / "raw", test_dir, "test", PrepareConfig(image_size=cache_size, n_jobs=2), progress=False)
        slices = with_neighbors(pd.read_parquet(test_dir / "slices.parquet"))  # as predict_test
        reps = -(-args.images // len(slices))
        table = pd.concat([slices] * reps, ignore_index=True).iloc[:args.images]  # the same slices again if few
        n = len(table)
        print(f"{len(slices)} prepared test slices, {n} images per timed pass; device: {dev}; "
              f"batch {args.batch}, {args.workers} loader workers, torch {torch.__version__}\n", flush=True)

        loader_rate = None
        for backbone in [b.strip() for b in args.backbones.split(",") if b.strip()]:
            exp_dir = tmp / "models" / f"bench_{backbone}"
            exp_dir.mkdir(parents=True)
            save_checkpoint(exp_dir / "fold0.pt", backbone, args)
            t = time.perf_counter()
            model, cfg, _ = load_fold_model(exp_dir / "fold0.pt", runtime)
            load_s = time.perf_counter() - t
            dataset = make_dataset(cfg, table, test_dir, cfg.final_size, train=False)
            if loader_rate is None:  # the input pipeline alone, same loader settings
                t = time.perf_counter()
                count = sum(len(b[0]) for b in make_loader(dataset, runtime, args.batch, args.workers))
                loader_rate = count / (time.perf_counter() - t)
            warm = make_dataset(cfg, table.iloc[:min(n, 2 * args.batch)], test_dir, cfg.final_size, train=False)
            for tta in (False, True):
                predict(model, make_loader(warm, runtime, args.batch, args.workers), runtime, tta_hflip=tta,
                        progress=False)  # warm-up: allocator, cuDNN autotuning, lazy init
                sync(runtime)
                t = time.perf_counter()
                probs, emb = predict(model, make_loader(dataset, runtime, args.batch, args.workers), runtime,
                                     tta_hflip=tta, progress=False)
                sync(runtime)
                seconds = time.perf_counter() - t
                assert probs.shape == (n, 6) and np.isfinite(probs).all() and emb.shape[0] == n
                rate = n / seconds
                rows.append({"backbone": backbone, "tta": tta, "rate": rate, "load_s": load_s,
                             "fold_s": N_TEST / rate + load_s, "emb": emb.shape[1]})
                print(f"{backbone:>14s} @ {cfg.final_size}px, flip TTA {'on ' if tta else 'off'}: "
                      f"{rate:8.1f} img/s", flush=True)
            del model

    print(f"\nloader alone ({args.workers} workers, cache read{' + resize' if cache_size != args.size else ''}): "
          f"{loader_rate:.0f} img/s\n")
    print(f"device: {dev}; {args.size} px, batch {args.batch}, {args.workers} loader workers")
    print(f"{'backbone':>14s} {'TTA':>4s} {'img/s':>9s} {'121,232 test slices / fold':>28s} "
          f"{'5 folds x 2 experiments':>24s}")
    for r in rows:
        print(f"{r['backbone']:>14s} {'on' if r['tta'] else 'off':>4s} {r['rate']:9.1f} {fmt_time(r['fold_s']):>28s} "
              f"{fmt_time(FOLDS * EXPERIMENTS * r['fold_s']):>24s}")
    print("(img/s counts images: with TTA each image takes two forward passes; projections add the checkpoint "
          "load per fold model)")


if __name__ == "__main__":
    main()
