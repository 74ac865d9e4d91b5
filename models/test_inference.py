"""Stage one on the test set: every fold of an experiment, averaged.

Writes MODEL_CHECKPOINT_DIR/<experiment>/test.parquet (image_id + six
probabilities, test slices.parquet order) and test_emb.npy (float16, rows
aligned): the mean over the fold models, each with flip TTA when configured.
A rerun reuses them when they cover exactly the current test images.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ich.cache import save_npy_atomic, write_atomic
from ich.labels import LABELS

from .config import from_dict
from .data import with_neighbors
from .inference import make_loader, predict
from .net import SliceNet
from .runtime import Runtime
from .trainer import make_dataset


class InferenceError(RuntimeError):
    """Stage-one test inference cannot run; the message says what is missing."""


def check_same_cache(train_dir: Path, test_dir: Path) -> None:
    """The test images must be cached like the train images the models learned from."""
    from ich.cache import read_meta
    train, test = read_meta(train_dir), read_meta(test_dir)
    if train is None or test is None:
        raise InferenceError(f"no cache_meta.json in {train_dir if train is None else test_dir}: run prepare_data.py")
    keys = ("format", "image_size", "windows", "sigmoid", "crop_border")
    differ = [k for k in keys if train.get(k) != test.get(k)]
    if differ:
        raise InferenceError(f"test cache ({test_dir}) was prepared with other {', '.join(differ)} than the train "
                             f"cache ({train_dir}): rerun prepare_data.py --split test --force with the train config")


def load_fold_model(path: Path, runtime: Runtime):
    """A fold checkpoint -> (model on the device, its experiment config). No pretrained file needed."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    cfg = from_dict(state["config"], where=str(path))
    model = SliceNet(cfg.model.backbone, None, cfg.model.dropout)  # weights come from the checkpoint
    model.load_state_dict(state["state_dict"])
    model = model.to(runtime.device)
    if runtime.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model, cfg


def predict_test(exp_dir: Path, test_dir: Path, runtime: Runtime, *, tta_hflip: bool = True, batch_size: int = 64,
                 num_workers: int = 2, force: bool = False, progress: bool = True, log=print) -> pd.DataFrame:
    slices_path = test_dir / "slices.parquet"
    if not slices_path.is_file():
        raise InferenceError(f"{slices_path} not found: run prepare_data.py --split test first")
    slices = with_neighbors(pd.read_parquet(slices_path))
    out_path = exp_dir / "test.parquet"
    if out_path.is_file() and not force:
        cached = pd.read_parquet(out_path)
        if cached["image_id"].tolist() == slices["image_id"].tolist() and (exp_dir / "test_emb.npy").is_file():
            log(f"{exp_dir.name}: stage-one test predictions reused ({out_path})")
            return cached
    folds = sorted(exp_dir.glob("fold*.pt"))
    folds = [p for p in folds if not p.name.endswith(".last.pt")]
    if not folds:
        raise InferenceError(f"no fold checkpoints in {exp_dir}: run train.py for {exp_dir.name} first")
    t0 = time.time()
    probs, emb = 0.0, 0.0
    for path in folds:
        model, cfg = load_fold_model(path, runtime)
        dataset = make_dataset(cfg, slices, test_dir, cfg.final_size, train=False)
        loader = make_loader(dataset, runtime, batch_size, num_workers)
        p, e = predict(model, loader, runtime, tta_hflip=tta_hflip, desc=f"{exp_dir.name} {path.stem} test",
                       progress=progress)
        probs = probs + p / len(folds)
        emb = emb + e.astype(np.float32) / len(folds)
    table = pd.DataFrame(probs, columns=list(LABELS))
    table.insert(0, "image_id", slices["image_id"].to_numpy())
    if runtime.is_main:
        save_npy_atomic(exp_dir / "test_emb.npy", emb.astype(np.float16))
        write_atomic(out_path, lambda p: table.to_parquet(p, index=False))
        log(f"{exp_dir.name}: stage one on {len(slices)} test images with {len(folds)} folds "
            f"in {time.time() - t0:.0f} s ({len(slices) * len(folds) / max(time.time() - t0, 1e-9):.0f} img/s "
            f"per fold model{', flip TTA' if tta_hflip else ''})")
    return table
