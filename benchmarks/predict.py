#!/usr/bin/env python
"""Stage-one test inference at steady state: the code predict.py runs, against its limits.

For each backbone, a fold checkpoint saved the way models/trainer.py saves it
(state dict + config; random weights) is loaded back with
models.checkpoint.load_fold_model (compiled as predict.py compiles it:
train.compile auto = on CUDA only), then, with and without horizontal-flip TTA:
(a) model alone: the forward pass(es) and probabilities on one uint8 batch
    already on the device, nothing else: the limit;
(b) predict path: models.inference.predict over the real dataset and
    DataLoader (make_dataset + make_loader: cache read, resize, uint8
    batches, pinned copies), probabilities and float16 embeddings kept
    (the validation and OOF loop; predict.py's test split now runs through
    the engine, pipeline.batch.stage_one_test: benchmarks/streaming.py and
    benchmarks/engine_stack.py time that one);
and, once, (c) loader alone: the same DataLoader without the model.
Every rate counts images (with TTA each image takes two forward passes) over
the batches after --warmup batches; start-up (checkpoint load, compiling,
worker start, the first batches) is printed on lines of its own, never mixed
into a rate. --profile adds a torch.profiler table of the predict path's
top entries (main process; the loader workers are other processes: their
work shows as the wait in `enumerate(DataLoader)...__next__`). Usage:

    .venv/bin/python benchmarks/predict.py [--backbones test_resnet,resnet18] [--size 128] [--batch 64]
        [--workers 1] [--warmup 3] [--batches 10] [--amp bf16] [--compile auto] [--profile]
    .venv/bin/python benchmarks/predict.py --config configs/seresnext50_256.yaml ...   # backbone, size, input mode

It prints the projected time of the 121,232 stage-2 test slices per fold
model and for 5 folds x 2 experiments (configs/predict/default.yaml). Target:
(b) >= 4,000 img/s per fold model with flip TTA on one H100.
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
from synthetic import generate_dataset  # noqa: E402
from models import runtime as rt  # noqa: E402
from models.config import from_dict, load_experiment  # noqa: E402
from models.data import with_neighbors  # noqa: E402
from models.inference import forward, is_compiled, make_loader, predict  # noqa: E402
from models.net import SliceNet  # noqa: E402
from models.checkpoint import load_fold_model, save_fold  # noqa: E402
from models.trainer import make_dataset  # noqa: E402

N_TEST = 121_232
FOLDS, EXPERIMENTS = 5, 2


class Marks:
    """on_batch hook: the clock after batch 1, after the warm-up and after the last batch."""

    def __init__(self, clock, warmup: int, total: int):
        self.clock, self.warmup, self.total = clock, warmup, total
        self.at = {0: clock()}

    def __call__(self, i: int) -> None:
        if i + 1 in (1, self.warmup, self.total):
            self.at[i + 1] = self.clock()

    def rate(self, batch: int) -> float:
        return (self.total - self.warmup) * batch / (self.at[self.total] - self.at[self.warmup])

    def startup(self) -> float:
        return self.at[self.warmup] - self.at[0]


def experiment_cfg(args, backbone: str):
    """The experiment timed: --config's (random weights; --backbones/--size override) or a plain one."""
    if args.config:
        cfg = load_experiment(args.config).to_dict()
        cfg["model"].update({"pretrained": None, "backbone": backbone})  # random weights: only speed counts
        if args.size:
            cfg["input"].update({"size": args.size, "progressive": None})
        cfg["train"].update({"batch_size": args.batch, "compile": args.compile})
        return from_dict(cfg)
    return from_dict({"name": f"bench_{backbone}", "model": {"backbone": backbone},
                      "input": {"mode": args.mode, "size": args.size or 128},
                      "train": {"batch_size": args.batch, "num_workers": args.workers, "amp": args.amp,
                                "channels_last": not args.no_channels_last, "epochs": 1,
                                "compile": args.compile}})


def save_checkpoint(path: Path, cfg, in_chans: int) -> None:
    """As models/trainer.py writes fold{k}.pt: weights + the experiment config (+ bookkeeping)."""
    model = SliceNet(cfg.model.backbone, None, cfg.model.dropout, in_chans)
    save_fold(path, model, cfg, fold=0, epoch=1, score=0.0, image_settings=None, provenance=None)


@torch.no_grad()
def model_alone(model, runtime, x: torch.Tensor, tta: bool, clock, warmup: int, batches: int):
    """(seconds of the warm-up batches, img/s after them) of predict's forward work on one device batch."""
    model.eval()

    def step():
        return forward(model, x, runtime, tta)

    t0 = clock()
    for _ in range(warmup):
        step()
    t1 = clock()
    for _ in range(batches):
        step()
    return t1 - t0, batches * len(x) / (clock() - t1)


def loader_alone(loader, clock, warmup: int) -> tuple[float, float]:
    """(seconds to the end of the warm-up batches, img/s after them) of the DataLoader alone."""
    t0 = clock()
    t1, count = t0, 0
    for i, (x, _, _) in enumerate(loader):
        if i + 1 == warmup:
            t1 = time.perf_counter()
        elif i + 1 > warmup:
            count += len(x)
    return t1 - t0, count / max(time.perf_counter() - t1, 1e-9)


def profile_table(model, loader, runtime, tta: bool, rows: int = 15) -> str:
    """torch.profiler over one predict pass (after the caller's warm-up), top entries by self time."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if runtime.device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        predict(model, loader, runtime, tta_hflip=tta, progress=False)
        if runtime.device.type == "cuda":
            torch.cuda.synchronize()
    key = "self_cuda_time_total" if runtime.device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows)


def fmt_time(seconds: float) -> str:
    return f"{seconds / 3600:.2f} h" if seconds >= 5400 else f"{seconds / 60:.1f} min"


def prepare_test_set(tmp: Path, args, cache_size: int) -> tuple[Path, pd.DataFrame]:
    print(f"generating and preparing {args.patients} test patients at {cache_size} px ...", flush=True)
    generate_dataset(tmp / "raw", n_train_patients=1, n_test_patients=args.patients,
                     image_size=max(256, cache_size), seed=5, n_jobs=2, progress=False)
    test_dir = tmp / "clean" / "test"
    prepare_split(tmp / "raw", test_dir, "test", PrepareConfig(image_size=cache_size, n_jobs=2), progress=False)
    slices = with_neighbors(pd.read_parquet(test_dir / "slices.parquet"))  # as the OOF pass
    n = (args.warmup + args.batches) * args.batch
    table = pd.concat([slices] * -(-n // len(slices)), ignore_index=True).iloc[:n]  # the same slices again
    return test_dir, table


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbones", help="comma-separated timm names (default test_resnet,resnet18, or the config's)")
    ap.add_argument("--config", help="an experiment config: its backbone, input mode and size, flip TTA")
    ap.add_argument("--size", type=int, help="model input size (default 128, or the config's final size; "
                                              "= the cache size unless --cache-size)")
    ap.add_argument("--cache-size", type=int, default=0, help="image cache size (0: the model's size, no resize)")
    ap.add_argument("--mode", default="windows", choices=["windows", "adjacent", "adjacent_windows"])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--workers", type=int, default=1, help="DataLoader workers")
    ap.add_argument("--warmup", type=int, default=3, help="batches run before timing starts")
    ap.add_argument("--batches", type=int, default=10, help="timed batches")
    ap.add_argument("--patients", type=int, default=4, help="generated test patients (about 50 slices each)")
    ap.add_argument("--amp", default="bf16", choices=["auto", "bf16", "fp16", "none"], help="CUDA only")
    ap.add_argument("--no-channels-last", action="store_true", help="CUDA only")
    ap.add_argument("--compile", default="auto", choices=["auto", "true", "false"],
                    help="torch.compile the backbone (auto: on CUDA only, as predict.py)")
    ap.add_argument("--profile", action="store_true", help="print a torch.profiler table of the predict path")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    runtime = rt.setup(args.amp, not args.no_channels_last)
    clock = runtime.now  # waits for the GPU's queued work
    if runtime.device.type == "cuda":
        dev = f"{torch.cuda.get_device_name()} (CUDA), amp {runtime.amp_dtype}, channels_last {runtime.channels_last}"
    else:
        dev = f"CPU ({platform.machine()}, {torch.get_num_threads()} torch threads), fp32"
    default = load_experiment(args.config).model.backbone if args.config else "test_resnet,resnet18"
    backbones = [b.strip() for b in (args.backbones or default).split(",") if b.strip()]
    first = experiment_cfg(args, backbones[0])
    cache_size = args.cache_size or first.final_size

    rows, loader_row = [], None
    with tempfile.TemporaryDirectory(prefix="bench_predict_") as tmp:
        tmp = Path(tmp)
        test_dir, table = prepare_test_set(tmp, args, cache_size)
        n = len(table)
        print(f"{n} images per pass ({args.warmup} warm-up + {args.batches} timed batches of {args.batch}); "
              f"device: {dev}; {args.workers} loader workers, torch {torch.__version__}\n", flush=True)
        for backbone in backbones:
            cfg = experiment_cfg(args, backbone)
            path = tmp / f"{backbone}.pt"
            save_checkpoint(path, cfg, 3 * (3 if cfg.input.mode == "adjacent_windows" else 1))
            t = clock()
            model, cfg, _ = load_fold_model(path, runtime)
            load_s = clock() - t
            if runtime.wants_compile(cfg.train.compile):
                model.compile_backbone()
            dataset = make_dataset(cfg, table, test_dir, cfg.final_size, train=False)
            loader = make_loader(dataset, runtime, args.batch, args.workers, persistent=True)  # as the OOF pass
            if loader_row is None:
                loader_row = loader_alone(make_loader(dataset, runtime, args.batch, args.workers), clock,
                                          args.warmup)
            x = next(iter(make_loader(dataset, runtime, args.batch, 0)))[0].to(runtime.device)
            if runtime.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            for tta in (False, True):
                warm_s, limit = model_alone(model, runtime, x, tta, clock, args.warmup, args.batches)
                marks = Marks(clock, args.warmup, args.warmup + args.batches)
                probs, emb = predict(model, loader, runtime, tta_hflip=tta, progress=False, on_batch=marks)
                assert probs.shape == (n, 6) and np.isfinite(probs).all() and emb.shape[0] == n
                rate = marks.rate(args.batch)
                rows.append({"backbone": backbone, "size": cfg.final_size, "tta": tta, "limit": limit,
                             "rate": rate, "warm_s": warm_s, "startup_s": marks.startup(), "load_s": load_s,
                             "compiled": is_compiled(model), "note": getattr(model, "compile_note", None)})
                print(f"{backbone:>18s} @ {cfg.final_size}px, flip TTA {'on ' if tta else 'off'}: "
                      f"(a) model alone {limit:8.1f} img/s, (b) predict path {rate:8.1f} img/s "
                      f"= {rate / limit:.2f}x (a)", flush=True)
            if args.profile:
                print(f"\ntorch.profiler, predict path, {backbone}, flip TTA on, {n} images "
                      f"(after the passes above):\n{profile_table(model, loader, runtime, True)}", flush=True)
            del model, loader

    print(f"\ndevice: {dev}; batch {args.batch}, {args.workers} loader workers; rates over {args.batches} "
          f"batches after {args.warmup} warm-up batches")
    start_s, loader_rate = loader_row
    print(f"(c) loader alone: {loader_rate:9.1f} img/s (start-up, workers + {args.warmup} batches: {start_s:.1f} s, "
          f"not in the rate)")
    for r in rows:
        tta = "on " if r["tta"] else "off"
        print(f"{r['backbone']:>18s} @ {r['size']}px TTA {tta}: (a) model alone {r['limit']:9.1f} img/s"
              f"{' (compiled)' if r['compiled'] else ''}, (b) predict path {r['rate']:9.1f} img/s, "
              f"ratio (b)/(a) {r['rate'] / r['limit']:.2f}x the limit; loader headroom (c)/(b) "
              f"{loader_rate / r['rate']:.1f}x")
        print(f"{'':>18s}   start-up: checkpoint load {r['load_s']:.1f} s, model warm-up"
              f"{' incl. compiling' if r['compiled'] else ''} {r['warm_s']:.1f} s, predict path to the end of "
              f"warm-up {r['startup_s']:.1f} s (not in the rates)" + (f"; {r['note']}" if r["note"] else ""))
    print(f"\n{'backbone':>18s} {'TTA':>4s} {'img/s':>9s} {'121,232 test slices / fold':>28s} "
          f"{'5 folds x 2 experiments':>24s}")
    for r in rows:
        fold_s = N_TEST / r["rate"] + r["load_s"]
        print(f"{r['backbone']:>18s} {'on' if r['tta'] else 'off':>4s} {r['rate']:9.1f} {fmt_time(fold_s):>28s} "
              f"{fmt_time(FOLDS * EXPERIMENTS * fold_s):>24s}")
    print("(img/s counts images: with TTA each image takes two forward passes; projections are (b) plus the "
          "checkpoint load per fold model; compiling is once per experiment, printed above)")


if __name__ == "__main__":
    main()
