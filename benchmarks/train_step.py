#!/usr/bin/env python
"""Stage one's training loop against the bare model step, in one run.

(a) bare: forward + backward + AdamW step on random uint8 batches already on
    the device (the ceiling for this model, batch and size);
(b) loop: models.trainer.run_epoch with the real pieces: the cache dataset,
    albumentations augmentations, the epoch sampler, DataLoader workers, the
    LR schedule and loss bookkeeping;
(c) loader alone: images per second per DataLoader worker.
Target: (b) >= 0.9x (a). Usage:

    .venv/bin/python benchmarks/train_step.py [--backbone resnet18] [--size 128] [--batch 32]
        [--steps 25] [--workers 1] [--amp bf16] [--channels-last]
On a GPU, pass --amp bf16 --channels-last and larger --size/--batch.
"""
from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ich.config import PrepareConfig  # noqa: E402
from ich.labels import LABELS  # noqa: E402
from ich.prepare import prepare_split  # noqa: E402
from ich.synthetic import generate_dataset  # noqa: E402
from models import runtime as rt  # noqa: E402
from models.config import from_dict  # noqa: E402
from models.data import EpochSampler, with_neighbors  # noqa: E402
from models.schedule import build_scheduler  # noqa: E402
from models.trainer import WeightedBCE, build_model, make_dataset, run_epoch  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"])
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    cfg = from_dict({
        "model": {"backbone": args.backbone}, "input": {"size": args.size},
        "augment": {"hflip": 0.5, "shift_scale_rotate": 0.5, "contrast": 0.3},
        "train": {"batch_size": args.batch, "num_workers": args.workers, "amp": args.amp,
                  "channels_last": args.channels_last, "epochs": 1},
    })
    runtime = rt.setup(args.amp, args.channels_last)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        generate_dataset(tmp / "raw", n_train_patients=6, n_test_patients=1, image_size=max(256, args.size),
                         seed=2, n_jobs=2, progress=False)
        prepare_split(tmp / "raw", tmp / "clean", "train",
                      PrepareConfig(image_size=args.size, n_folds=2, n_jobs=2), progress=False)
        slices = with_neighbors(pd.read_parquet(tmp / "clean" / "slices.parquet"))
        n = args.steps * args.batch
        table = slices.sample(n, replace=len(slices) < n, random_state=0).reset_index(drop=True)

        model = build_model(cfg, runtime)
        criterion = WeightedBCE().to(runtime.device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        fmt = torch.channels_last if runtime.channels_last else torch.contiguous_format
        x = torch.randint(0, 255, (args.batch, 3, args.size, args.size), dtype=torch.uint8,
                          device=runtime.device).contiguous(memory_format=fmt)
        y = torch.rand(args.batch, len(LABELS), device=runtime.device).round()

        def bare(steps):
            model.train()
            for _ in range(steps):
                with runtime.autocast():
                    loss = criterion(model(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                loss.item()  # the loop reads the loss every step too
            if runtime.device.type == "cuda":
                torch.cuda.synchronize()

        bare(2)  # warm-up
        t = time.perf_counter()
        bare(args.steps)
        bare_rate = args.steps * args.batch / (time.perf_counter() - t)

        dataset = make_dataset(cfg, table, tmp / "clean", args.size, train=True)
        sampler = EpochSampler(table["any"].to_numpy(), seed=0)
        loader = DataLoader(dataset, batch_size=args.batch, sampler=sampler, num_workers=args.workers,
                            pin_memory=runtime.device.type == "cuda",
                            prefetch_factor=4 if args.workers else None)
        optimizer = torch.optim.AdamW(
            [{"params": list(model.backbone_parameters())}, {"params": list(model.head_parameters())}], lr=1e-4)
        sched = build_scheduler(optimizer, cfg.optim, total_steps=args.steps, steps_per_epoch=args.steps)
        scaler = torch.amp.GradScaler(enabled=runtime.amp_dtype == torch.float16)
        t = time.perf_counter()
        run_epoch(model, loader, criterion, optimizer, sched, scaler, runtime, cfg, desc="loop", progress=False)
        if runtime.device.type == "cuda":
            torch.cuda.synchronize()
        loop_rate = n / (time.perf_counter() - t)

        one = DataLoader(dataset, batch_size=args.batch, num_workers=1, prefetch_factor=4)
        t = time.perf_counter()
        count = sum(len(b[0]) for b in one)
        loader_rate = count / (time.perf_counter() - t)

    dev = torch.cuda.get_device_name() if runtime.device.type == "cuda" else f"CPU ({platform.machine()})"
    print(f"\ndevice: {dev}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"{args.backbone} @ {args.size}px, batch {args.batch}, amp {args.amp}, channels_last {args.channels_last}, "
          f"loader workers {args.workers}")
    print(f"(a) bare step         : {bare_rate:8.1f} img/s")
    print(f"(b) train.py loop     : {loop_rate:8.1f} img/s")
    print(f"ratio (b)/(a)         : {loop_rate / bare_rate:8.2f}x  (target >= 0.9x)")
    print(f"(c) loader, 1 worker  : {loader_rate:8.1f} img/s per worker (cache read + resize + augment)")
    full = 752_803 * 4 / 5
    print(f"one epoch over 4/5 of 752,803 slices at (b): {full / loop_rate / 3600:.2f} h")


if __name__ == "__main__":
    main()
