#!/usr/bin/env python
"""predict.py's stage one on a test split by its two roads: cached (prepare_data.py --split test, then
every fold model on the cache) against streamed (the in-memory engine, pipeline.batch, no image written).

For one predict config's trained models and a raw test split (default: the
settings' RAW_DATA_DIR), in a temporary folder:
- cached: `prepare_split` (the train cache's image settings, `--workers`
  processes) into a fresh test cache, then `pipeline.batch.stage_one_test`
  on it (the engine reading the cache's rows);
- streamed: the same `stage_one_test` without a test cache (header scan,
  decode in `--workers` DataLoader workers, every fold model per batch).
Reported: seconds, test slices per second (files / wall time, decode
included on both roads) and the disk each road wrote for images (the cache)
and in all under the test clean dir; and the largest difference between the
two roads' fold-model probabilities (they must agree). Usage:

    .venv/bin/python benchmarks/streaming.py --settings SETTINGS.demo.json --config configs/predict/demo.yaml
    .venv/bin/python benchmarks/streaming.py --raw data/bench_test/raw   # a larger generated test split
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def folder_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in Path(root).rglob("*") if p.is_file() and not p.is_symlink())


def model_tree(src: Path, dst: Path, experiments) -> Path:
    """Links to the checkpoints and OOF files of each experiment (no test outputs): each road writes its own."""
    for exp in experiments:
        (dst / exp).mkdir(parents=True)
        for path in (src / exp).iterdir():
            if not path.name.startswith("test") and path.is_file():
                (dst / exp / path.name).symlink_to(path.resolve())
    return dst


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--settings", default="SETTINGS.demo.json")
    ap.add_argument("--config", default="configs/predict/demo.yaml")
    ap.add_argument("--raw", help="a raw folder holding stage_2_test/ (default: the settings' RAW_DATA_DIR)")
    ap.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    args = ap.parse_args()

    import numpy as np
    import pandas as pd
    import torch

    from ich.cache import IMAGES, read_meta
    from ich.config import cache_settings, prepare_config_from
    from ich.labels import LABELS
    from ich.prepare import TEST_DIR, prepare_split
    from ich.settings import load_settings
    from models import runtime as rt
    from pipeline.batch import stage_one_test
    from stacking.config import load_predict_config

    settings = load_settings(args.settings)
    cfg = dataclasses.replace(load_predict_config(args.config), num_workers=args.workers)
    raw = Path(args.raw) if args.raw else settings.raw_data_dir
    n_files = len(list((raw / TEST_DIR).iterdir()))
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU, {os.cpu_count()} cores"
    print(f"machine: {platform.node()} ({device}); torch threads {torch.get_num_threads()}; "
          f"{args.workers} workers; {n_files} test files in {raw / TEST_DIR}")
    runtime = rt.setup(cfg.amp, True)
    with tempfile.TemporaryDirectory(prefix="ich_bench_stream_") as tmp:
        tmp = Path(tmp)
        # cached road: prepare the test cache like the train cache, then stage one from it
        prep = prepare_config_from({**cache_settings(read_meta(settings.train_clean_dir)), "n_jobs": args.workers},
                                   "train cache", "bench")
        t = time.perf_counter()
        prepare_split(raw, tmp / "cached_test", "test", prep, progress=False)
        t_prep = time.perf_counter() - t
        models_c = model_tree(settings.model_checkpoint_dir, tmp / "models_cached", cfg.experiments)
        cached_settings = dataclasses.replace(settings, raw_data_dir=raw, test_clean_dir=tmp / "cached_test",
                                              model_checkpoint_dir=models_c)
        t = time.perf_counter()
        stage_one_test(cfg, cached_settings, runtime, progress=False, log=lambda *a: None)
        t_stage1 = time.perf_counter() - t
        cache_bytes = (tmp / "cached_test" / IMAGES).stat().st_size
        cached_all = folder_bytes(tmp / "cached_test")

        # streamed road: the engine on the raw DICOMs
        models_s = model_tree(settings.model_checkpoint_dir, tmp / "models_streamed", cfg.experiments)
        streamed_settings = dataclasses.replace(settings, raw_data_dir=raw, test_clean_dir=tmp / "streamed_test",
                                                model_checkpoint_dir=models_s)
        t = time.perf_counter()
        stage_one_test(cfg, streamed_settings, runtime, progress=False, log=lambda *a: None)
        t_stream = time.perf_counter() - t
        streamed_all = folder_bytes(tmp / "streamed_test")
        images_streamed = sum(p.stat().st_size for p in (tmp / "streamed_test").rglob(IMAGES))

        worst = 0.0
        for exp in cfg.experiments:
            for a in sorted((models_c / exp).glob("test_fold*.parquet")):
                x = pd.read_parquet(a).set_index("image_id")
                y = pd.read_parquet(models_s / exp / a.name).set_index("image_id")
                worst = max(worst, float(np.abs(x.loc[y.index, list(LABELS)].to_numpy()
                                                - y[list(LABELS)].to_numpy()).max()))
    rt.teardown()
    total_c = t_prep + t_stage1
    print(f"cached road:   prepare {t_prep:6.1f} s + stage one {t_stage1:6.1f} s = {total_c:6.1f} s "
          f"({n_files / total_c:7.1f} slices/s); images on disk {cache_bytes / 1e6:8.1f} MB "
          f"(test clean dir {cached_all / 1e6:.1f} MB)")
    print(f"streamed road: stage one, decode included         {t_stream:6.1f} s "
          f"({n_files / t_stream:7.1f} slices/s); images on disk {images_streamed / 1e6:8.1f} MB "
          f"(test clean dir {streamed_all / 1e6:.3f} MB)")
    print(f"streamed / cached time: {t_stream / total_c:.2f}x; largest probability difference between the roads "
          f"{worst:.1e}")


if __name__ == "__main__":
    main()
