#!/usr/bin/env python
"""Stage one's training loop against the bare model step, at steady state, in one run.

(a) bare step, eager: forward + backward + the config's optimizer step
    (optim.name, built by models.optim.create_optimizer: AdamW by default)
    on random uint8 batches already on the device;
(a') bare step, torch.compile + the fused optimizer (fused on CUDA only, for
    adamw and adam): the ceiling for this model, batch and size;
(b) loop: models.trainer.run_epoch with the real pieces: the cache dataset,
    albumentations augmentations, the tagged epoch sampler and the trainer's
    persistent-worker DataLoader (models.trainer.train_loader), the LR
    schedule and loss bookkeeping, compiled like (a') with --compile;
(c) loader alone: the same DataLoader without the model.
Every rate counts only the steps after --warmup steps: start-up (worker
start, cuDNN autotuning, the first batches) and compiling are printed on
lines of their own, not mixed into the rates. (Timing whole short runs
measured start-up: 0.53-0.81x for a loop that runs at 0.98x of eager at
steady state on an H100.) Target: (b) >= 0.9x (a'). Usage:

    .venv/bin/python benchmarks/train_step.py [--backbone resnet18] [--size 128] [--batch 32]
        [--steps 25] [--warmup 10] [--workers 1] [--amp bf16] [--channels-last] [--compile auto|true|false]
On a GPU: --amp bf16 --channels-last and larger --size/--batch/--workers, e.g.
    --backbone seresnext50_32x4d --size 256 --batch 128 --workers 14 --steps 100 --warmup 40
--config configs/X.yaml takes the backbone, input mode, size, batch, augmentations and
sampler from an experiment config (--size/--batch/--backbone still override), and the
projected wall time of the config's training is printed: epochs x folds x training
slices per epoch / (b), on the 752,803 stage-2 train slices (4/5 of them per fold; a
balanced sampler draws every `any` positive, about 14%, and neg_ratio times as many
negatives). Without --size, every size of the config's progressive schedule is
measured in turn, (a) to (c) each, with a static compile per size as train.py
compiles (models.net.SliceNet.compile_backbone), on one cache at the largest size
(smaller sizes shrink each image as they load, as in the real run), and each epoch
is projected at its own size's measured rate. With --size, that size alone is
measured and epochs at other sizes are scaled from it by their pixel count, and say so.
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
from synthetic import generate_dataset  # noqa: E402
from models import runtime as rt  # noqa: E402
from models.config import from_dict  # noqa: E402
from models.augment import EpochSeeder  # noqa: E402
from models.config import load_experiment  # noqa: E402
from models.data import EpochSampler, input_channels, with_neighbors  # noqa: E402
from models.optim import build_scheduler, create_optimizer, param_groups  # noqa: E402
from models.trainer import (WeightedBCE, build_model, build_scaler, make_dataset, run_epoch,  # noqa: E402
                            train_loader)

TRAIN_SLICES = 752_803  # stage-2 train images
ANY_SHARE = 0.14  # share of them with any = 1 (benchmarks/stacking.py generates the same)
FOLDS = 5


def bare_rate(model, optimizer, criterion, x, y, runtime, clock, warmup: int, steps: int) -> tuple[float, float]:
    """(seconds of the warm-up steps, img/s over the timed steps) of forward + backward + step."""
    def step():
        with runtime.autocast():
            loss = criterion(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss.item()  # the loop reads the loss every step too

    model.train()
    t0 = clock()
    for _ in range(warmup):
        step()
    t1 = clock()
    for _ in range(steps):
        step()
    return t1 - t0, steps * len(x) / (clock() - t1)


def optimizer_for(model, cfg, runtime, fused: bool):
    """The config's optimizer over the trainer's two parameter groups (models.optim), fused on CUDA if asked."""
    return create_optimizer(param_groups(model), cfg.optim, fused=fused and runtime.device.type == "cuda")


def bench_cfg(args):
    """The experiment being timed: --config's (random weights) or a plain one; CLI values override."""
    if args.config:
        data = load_experiment(args.config).to_dict()
        data["model"]["pretrained"] = None
    else:
        data = {"name": "bench", "augment": {"hflip": 0.5, "shift_scale_rotate": 0.5, "contrast": 0.3},
                "model": {"backbone": "resnet18"}, "input": {"size": 128}, "train": {"batch_size": 32, "epochs": 1}}
    if args.backbone:
        data["model"]["backbone"] = args.backbone
    if args.size and args.size not in [s for s, _ in data["input"].get("progressive") or []]:
        data["input"].update({"size": args.size, "progressive": None})  # not in the schedule: time and project it
    if args.batch:
        data["train"]["batch_size"] = args.batch
    data["train"].update({"num_workers": args.workers, "amp": args.amp, "channels_last": args.channels_last,
                          "compile": args.compile, "accumulate": 1})
    return from_dict(data)


def epoch_slices(cfg) -> float:
    """Training slices one epoch of one fold draws on the full data (4/5 of the slices are its train part)."""
    train = TRAIN_SLICES * (FOLDS - 1) / FOLDS
    if cfg.sampler.kind == "balanced":
        return min(train, train * ANY_SHARE * (1 + cfg.sampler.neg_ratio))
    return train


def projection(cfg, rates: dict[int, float]) -> list[str]:
    """Lines: each epoch's size, slices and hours at the loop rate measured at its size (else scaled by
    pixels from the nearest measured size), and the total."""
    lines, total = [], 0.0
    for epoch in range(cfg.train.epochs):
        s = cfg.size_at(epoch)
        size = min(rates, key=lambda m: abs(m - s))
        r = rates[size] * (size / s) ** 2
        hours = epoch_slices(cfg) / r / 3600
        total += hours
        how = "measured" if s == size else f"scaled from {size} px by pixels"
        lines.append(f"  epoch {epoch + 1}: {s} px, {epoch_slices(cfg):,.0f} slices at {r:,.0f} img/s ({how}): "
                     f"{hours:.2f} h per fold")
    lines.append(f"projected training wall time of {cfg.name}: {cfg.train.epochs} epochs x {FOLDS} folds = "
                 f"{total * FOLDS:.1f} h at (b) (training steps only: validation, OOF and test inference not in it)")
    return lines


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="an experiment config: backbone, input, batch, augmentations, sampler; "
                                      "prints the projected training wall time")
    ap.add_argument("--backbone", help="timm name (default resnet18, or the config's)")
    ap.add_argument("--size", type=int, help="input size (default 128, or the config's final size)")
    ap.add_argument("--batch", type=int, help="batch size (default 32, or the config's)")
    ap.add_argument("--steps", type=int, default=25, help="timed steps (after the warm-up)")
    ap.add_argument("--warmup", type=int, default=10, help="steps run before timing starts")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"])
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--compile", default="auto", choices=["auto", "true", "false"],
                    help="(a') and the loop compiled (auto: on CUDA only; CPU compiles take minutes)")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    cfg = bench_cfg(args)
    if args.size or not cfg.input.progressive:
        sizes = [args.size or cfg.final_size]
    else:  # every size of the schedule, in schedule order
        sizes = list(dict.fromkeys(int(s) for s, _ in cfg.input.progressive))
    args.backbone, args.batch = cfg.model.backbone, cfg.train.batch_size
    runtime = rt.setup(args.amp, args.channels_last)
    rates = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        generate_dataset(tmp / "raw", n_train_patients=6, n_test_patients=1, image_size=max(256, *sizes),
                         seed=2, n_jobs=2, progress=False)
        prepare_split(tmp / "raw", tmp / "clean", "train",
                      PrepareConfig(image_size=max(sizes), n_folds=2, n_jobs=2), progress=False)
        slices = with_neighbors(pd.read_parquet(tmp / "clean" / "slices.parquet"))
        for size in sizes:
            result = measure(cfg, args, runtime, size, tmp / "clean", slices)
            report(args, runtime, size, result)
            rates[size] = result["loop"]
    if args.config:
        print("\n".join(projection(cfg, rates)))


def measure(cfg, args, runtime, size: int, clean: Path, slices: pd.DataFrame) -> dict:
    """(a), (a'), (b) and (c) at one input size; a fresh model (and static compile) for each."""
    in_chans = input_channels(cfg.input.mode, 3)  # the generated cache has 3 windows
    compiled = runtime.wants_compile(args.compile)
    clock = runtime.now  # waits for the GPU's queued work
    total = args.warmup + args.steps
    n = total * args.batch
    table = slices.sample(n, replace=len(slices) < n, random_state=0).reset_index(drop=True)

    criterion = WeightedBCE().to(runtime.device)
    fmt = torch.channels_last if runtime.channels_last else torch.contiguous_format
    x = torch.randint(0, 255, (args.batch, in_chans, size, size), dtype=torch.uint8,
                      device=runtime.device).contiguous(memory_format=fmt)
    y = torch.rand(args.batch, len(LABELS), device=runtime.device).round()

    model = build_model(cfg, runtime, in_chans)
    _, eager = bare_rate(model, optimizer_for(model, cfg, runtime, False), criterion, x, y, runtime, clock,
                         args.warmup, args.steps)
    ceiling, compile_s = eager, None
    if compiled:
        model = build_model(cfg, runtime, in_chans)
        model.compile_backbone()
        compile_s, ceiling = bare_rate(model, optimizer_for(model, cfg, runtime, True), criterion, x, y, runtime, clock,
                                       args.warmup, args.steps)
        if model.compile_note:
            print(model.compile_note)
            compiled = False

    model = build_model(cfg, runtime, in_chans)
    if compiled:
        model.compile_backbone()
    dataset = make_dataset(cfg, table, clean, size, train=True)
    dataset.on_epoch = EpochSeeder(cfg.train.seed, 0)
    sampler = EpochSampler(table["any"].to_numpy(), seed=0, tagged=True)  # as train_fold
    sampler.set_epoch(0, size)
    loader = train_loader(dataset, sampler, cfg, runtime, drop_last=compiled)
    optimizer = optimizer_for(model, cfg, runtime, compiled)
    sched = build_scheduler(optimizer, cfg.optim, total_steps=total, steps_per_epoch=total)
    scaler = build_scaler(runtime)
    marks = {}

    def mark(i):
        if i + 1 in (1, args.warmup, total):
            marks[i + 1] = clock()

    marks[0] = clock()
    run_epoch(model, loader, criterion, optimizer, sched, scaler, runtime, cfg, desc="loop", progress=False,
              on_batch=mark)
    loop = args.steps * args.batch / (marks[total] - marks[args.warmup])

    one = DataLoader(dataset, batch_size=args.batch, num_workers=args.workers, sampler=sampler,
                     prefetch_factor=4 if args.workers else None)
    t0 = t1 = clock()
    count = 0
    for i, (xb, _, _) in enumerate(one):
        if i + 1 == args.warmup:
            t1 = time.perf_counter()
        elif i + 1 > args.warmup:
            count += len(xb)
    return {"eager": eager, "ceiling": ceiling, "compile_s": compile_s, "compiled": compiled, "loop": loop,
            "first_batch_s": marks[1] - marks[0], "warmup_s": marks[args.warmup] - marks[0],
            "loader": count / max(time.perf_counter() - t1, 1e-9), "loader_start_s": t1 - t0}


def report(args, runtime, size: int, r: dict) -> None:
    dev = torch.cuda.get_device_name() if runtime.device.type == "cuda" else f"CPU ({platform.machine()})"
    print(f"\ndevice: {dev}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"{args.backbone} @ {size}px, batch {args.batch}, amp {args.amp}, channels_last {args.channels_last}, "
          f"loader workers {args.workers}; rates over {args.steps} steps after {args.warmup} warm-up steps")
    eager, ceiling, loop = r["eager"], r["ceiling"], r["loop"]
    print(f"(a)  bare step, eager          : {eager:8.1f} img/s")
    if r["compile_s"] is not None:
        print(f"(a') bare step, compiled+fused : {ceiling:8.1f} img/s  ({ceiling / eager:.2f}x eager)")
        print(f"     compile + warm-up         : {r['compile_s']:8.1f} s (static graph for {size} px; not in any rate)")
    else:
        print("(a') bare step, compiled+fused :      n/a (compile off: --compile true to force)")
    print(f"(b)  train.py loop             : {loop:8.1f} img/s{' (compiled)' if r['compiled'] else ''}")
    print(f"     loop start-up             : {r['first_batch_s']:8.1f} s to the first batch done, "
          f"{r['warmup_s']:.1f} s for the warm-up (not in the rate)")
    print(f"ratio (b)/(a)                  : {loop / eager:8.2f}x  eager")
    print(f"ratio (b)/(a')                 : {loop / ceiling:8.2f}x  the limit (target >= 0.9x)")
    print(f"(c)  loader alone              : {r['loader']:8.1f} img/s with {args.workers} workers "
          f"(start-up {r['loader_start_s']:.1f} s, not in the rate)")
    full = TRAIN_SLICES * (FOLDS - 1) / FOLDS
    print(f"one epoch over 4/5 of 752,803 slices at (b): {full / loop / 3600:.2f} h")

if __name__ == "__main__":
    main()
