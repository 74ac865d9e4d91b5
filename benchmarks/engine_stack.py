#!/usr/bin/env python
"""The in-memory engine with a predict config's whole stack of fold models, random weights: load time,
one study's stage one, and test slices per second (the Kaggle kernel's pace).

No trained checkpoint and no pretrained file is needed: every experiment of
`--config` (default: the shipped default stack, seresnext50_512 +
resnext50_512 + resnext101_512, 5 fold models each) gets `--folds`
fold checkpoints of random weights in a temporary folder, in train.py's
format, with the image settings of `--prepare` (configs/prepare/512.yaml:
the cache the stack is trained on). A generated study of `--slices` slices
at `--size` px (python -m synthetic's phantoms) is run through
`Engine.stage_one` `--repeats` times (median), as a study and, decoded by
`--workers` DataLoader workers, as a test split (slices/s for the whole
stack, decode included). Stage two is not included (it needs trained
boosters; on the demo it costs 0.03 s a study). Targets: a
40-slice study <= 2 s on a GPU with this stack. One command for a GPU
session:

    PYTHONUNBUFFERED=1 timeout 900 python benchmarks/engine_stack.py --slices 40 --series 8 --workers 12

On the 2-core CPU VM, a smoke run: `--slices 4 --series 1 --folds 1 --repeats 1`.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
REPO = Path(__file__).resolve().parents[1]


def random_checkpoints(cfg, prepare, root: Path, folds: int) -> Path:
    """MODEL_CHECKPOINT_DIR/<experiment>/fold{k}.pt of random weights, as train.py writes them."""
    from ich.cache import FORMAT_VERSION, image_settings
    from ich.stage_one import fold_checkpoint
    from models.checkpoint import save_fold
    from models.config import load_experiment
    from models.data import input_channels
    from models.net import SliceNet
    settings = image_settings({"format": FORMAT_VERSION, **prepare.cache_key()})  # as train.py stores them
    for exp in cfg.experiments:
        ecfg = load_experiment(REPO / "configs" / f"{exp}.yaml")
        chans = input_channels(ecfg.input.mode, len(prepare.windows))
        net = SliceNet(ecfg.model.backbone, None, ecfg.model.dropout, chans)
        (root / exp).mkdir(parents=True)
        for k in range(folds):
            save_fold(fold_checkpoint(root / exp, k), net, ecfg, fold=k, epoch=ecfg.train.epochs, score=0.0,
                      image_settings=settings, provenance=None)
    return root


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/predict/default.yaml")
    ap.add_argument("--prepare", default="configs/prepare/512.yaml")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--slices", type=int, default=40, help="slices of the study")
    ap.add_argument("--series", type=int, default=4, help="series of the test-split run (each --slices long)")
    ap.add_argument("--size", type=int, default=512, help="DICOM rows = columns")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    ap.add_argument("--batch-size", type=int, default=None, help="default: the predict config's")
    args = ap.parse_args()

    import torch

    from ich.config import load_prepare_config
    from ich.dicom import read_header
    from models import runtime as rt
    from pipeline.decode import SliceFile
    from pipeline.engine import Engine, Sink
    from stacking.config import load_predict_config
    from synthetic.generate import generate_dataset

    cfg = load_predict_config(args.config)
    if args.batch_size:
        cfg = dataclasses.replace(cfg, batch_size=args.batch_size)
    prepare = load_prepare_config(args.prepare)
    runtime = rt.setup(cfg.amp, True)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU, {os.cpu_count()} cores"
    print(f"machine: {platform.node()} ({device}); torch {torch.__version__}; {cfg.name}: "
          f"{', '.join(cfg.experiments)} x {args.folds} fold models; batch {cfg.batch_size}", flush=True)
    with tempfile.TemporaryDirectory(prefix="ich_bench_stack_") as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        generate_dataset(tmp / "raw", n_train_patients=1, n_test_patients=args.series, image_size=args.size,
                         seed=0, n_jobs=min(4, args.workers), progress=False, min_slices=args.slices)
        by_series: dict[str, list] = {}
        for path in sorted((tmp / "raw" / "stage_2_test").glob("*.dcm")):
            by_series.setdefault(read_header(path).series_id, []).append(SliceFile(str(path), path.name, None))
        series = sorted(by_series.values(), key=len, reverse=True)
        study = series[0][:args.slices]
        print(f"generated {sum(map(len, series))} test slices in {len(series)} series ({args.size} px) in "
              f"{time.perf_counter() - t:.0f} s", flush=True)
        random_checkpoints(cfg, prepare, tmp / "models", args.folds)

        t = time.perf_counter()
        engine = Engine(cfg, tmp / "models", runtime, stage_two=False, num_workers=args.workers)
        print(f"engine loaded ({len(engine.fold_models)} fold models, inputs "
              f"{sorted(set(f.spec for f in engine.fold_models))}): {time.perf_counter() - t:.1f} s", flush=True)

        def timed(groups):
            if runtime.device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            sink = engine.stage_one(groups, Sink(keep_embeddings=False))
            if runtime.device.type == "cuda":
                torch.cuda.synchronize()
            return time.perf_counter() - t, sink

        first, _ = timed([study])  # compiles (CUDA), warms up
        print(f"first study (compile + warm-up, not counted): {first:.2f} s", flush=True)
        runs = []
        for i in range(args.repeats):
            seconds, sink = timed([study])
            runs.append(seconds)
            print(f"study run {i + 1}: {seconds:.3f} s (decode wait {sink.seconds['prepare']:.3f} s, "
                  f"models {sink.seconds['stage one']:.3f} s)", flush=True)
        print(f"{len(study)}-slice study, stage one of the whole stack: median {statistics.median(runs):.3f} s "
              f"(target <= 2 s on a GPU, stage two not included)", flush=True)
        seconds, sink = timed(series)
        n = sum(map(len, series))
        print(f"test-split run: {n} slices in {seconds:.1f} s = {n / seconds:.1f} slices/s through "
              f"{len(engine.fold_models)} fold models ({args.workers} decode workers; decode wait "
              f"{sink.seconds['prepare']:.1f} s, models {sink.seconds['stage one']:.1f} s)", flush=True)
        engine.close()
    rt.teardown()


if __name__ == "__main__":
    main()
