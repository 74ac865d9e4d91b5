"""Stage one on a whole split (the test set): every fold model of an experiment, one output each.

Writes, in MODEL_CHECKPOINT_DIR/<experiment>/ (ARCHITECTURE.md, contract 2):
- `test_fold{k}.parquet` (image_id + six probabilities, test slices.parquet
  order) and `test_fold{k}_emb.npy` (float16 pooled embeddings, rows
  aligned): fold model k alone. Stage two builds its test features from
  each of these sets separately, because each OOF row came from one fold
  model too; a mean of fold models is a distribution no booster trained on.
- `test.parquet`: the mean over fold models, for a stage-one-only
  submission and the report; stage two never reads it.
- `test_meta.json`: what produced them. A rerun reuses the outputs only when
  the key matches: the checkpoints' bytes (a retrained fold, a changed TTA
  or normalization, which live in the checkpoint, all change it), the test
  cache's image settings and files, and the test image IDs.

Every fact the predictions depend on comes from the checkpoint: the
experiment config (input mode, size, flip TTA), the normalization and the
sampler correction (model buffers), and the train cache's image settings,
which the test cache must match.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pandas as pd
import torch

from ich.cache import image_settings, read_meta, save_npy_atomic, write_atomic
from ich.labels import LABELS
from ich.stage_one import file_digest, fold_checkpoints

from .checkpoint import load_fold_model, read_provenance
from .data import with_neighbors
from .inference import is_compiled, make_loader, predict
from .runtime import Runtime
from .trainer import make_dataset

META = "test_meta.json"


class InferenceError(RuntimeError):
    """Stage-one test inference cannot run; the message says what is missing."""


def check_same_cache(train_dir: Path, test_dir: Path) -> None:
    """The test images must be cached like the train images the models learned from."""
    train, test = read_meta(train_dir), read_meta(test_dir)
    if train is None or test is None:
        raise InferenceError(f"no cache_meta.json in {train_dir if train is None else test_dir}: run prepare_data.py")
    _compare(image_settings(train), test, f"the train cache ({train_dir})", test_dir)


def _compare(trained: dict, test_meta: dict, what: str, test_dir: Path) -> None:
    test = image_settings(test_meta)
    differ = [k for k in trained if trained[k] != test[k]]
    if differ:
        raise InferenceError(f"test cache ({test_dir}) was prepared with other {', '.join(differ)} than {what}: "
                             "rerun prepare_data.py --split test --force with the config the train cache used")


def training_records(model_dir: Path, experiments, train_dir: Path) -> dict[str, list[dict]]:
    """{experiment: the distinct reproducibility records of its fold checkpoints (ich.provenance), their
    creation times left out}.

    Raises InferenceError when the experiments were trained from caches of
    different file lists, or from another train cache than `train_dir`:
    stage two joins their OOF rows slice by slice, and one submission must
    come from one data set. (Caches that differ in image settings are caught
    against the test cache, check_same_cache and _compare.) Checkpoints from
    before the record existed carry none and are not compared.
    """
    records, digests = {}, {}
    for exp in experiments:
        found = []
        for path in fold_checkpoints(Path(model_dir) / exp).values():
            rec = read_provenance(path)
            if rec is None:
                continue
            rec = {k: v for k, v in rec.items() if k != "created"}  # the fold models of one run: one record
            digests.setdefault(rec.get("cache_files_digest"), set()).add(exp)
            if rec not in found:
                found.append(rec)
        records[exp] = found
    current = (read_meta(train_dir) or {}).get("files_digest")
    if len(digests) > 1 or (digests and current not in digests):
        seen = "; ".join(f"{', '.join(sorted(e))} from a cache with file-list digest {str(d)[:12]}"
                         for d, e in digests.items())
        raise InferenceError(f"the experiments were trained from different caches ({seen}); the train cache "
                             f"{train_dir} has file-list digest {str(current)[:12]}: retrain them on one cache")
    return records


def require_fold_checkpoints(exp_dir: Path) -> dict[int, Path]:
    """fold_checkpoints(exp_dir), which must not be empty: else an InferenceError saying to train first.

    The one place that says so: test inference (predict_test), a study and
    the web viewer's models all need an experiment's fold models.
    """
    exp_dir = Path(exp_dir)
    checkpoints = fold_checkpoints(exp_dir)
    if not checkpoints:
        raise InferenceError(f"no fold checkpoints in {exp_dir}: run train.py for {exp_dir.name} first")
    return checkpoints


def outputs_key(checkpoints: dict[int, Path], test_dir: Path, image_ids) -> dict:
    """What the test outputs depend on; equal keys mean equal outputs (up to float noise)."""
    meta = read_meta(test_dir) or {}
    ids = hashlib.sha1("\0".join(map(str, image_ids)).encode()).hexdigest()
    return {"checkpoints": {str(k): file_digest(p) for k, p in checkpoints.items()},
            "test_cache": {**image_settings(meta), "n_files": meta.get("n_files"),
                           "files_digest": meta.get("files_digest")},
            "image_ids": ids}


def output_paths(exp_dir: Path, k: int) -> tuple[Path, Path]:
    return exp_dir / f"test_fold{k}.parquet", exp_dir / f"test_fold{k}_emb.npy"


def _reusable(exp_dir: Path, key: dict, folds) -> bool:
    try:
        stored = json.loads((exp_dir / META).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    files = [p for k in folds for p in output_paths(exp_dir, k)] + [exp_dir / "test.parquet"]
    return stored == key and all(p.is_file() for p in files)


def split_loader(loaders: dict, cfg, slices, test_dir: Path, runtime: Runtime, batch_size: int, num_workers: int):
    """The test DataLoader for a fold model's input settings, one per settings for all fold models.

    Its workers persist between the fold models' passes: started once per
    experiment instead of once per fold model.
    """
    key = (cfg.input.mode, cfg.input.adjacent_channel, cfg.final_size)
    if key not in loaders:
        dataset = make_dataset(cfg, slices, test_dir, cfg.final_size, train=False)
        loaders[key] = make_loader(dataset, runtime, batch_size, num_workers, persistent=True)
    return loaders[key]


def predict_test(exp_dir: Path, test_dir: Path, runtime: Runtime, *, batch_size: int = 64, num_workers: int = 2,
                 force: bool = False, progress: bool = True, log=print) -> pd.DataFrame:
    """Every fold model of one experiment on the test split; returns the fold mean (test.parquet's table)."""
    slices_path = test_dir / "slices.parquet"
    if not slices_path.is_file():
        raise InferenceError(f"{slices_path} not found: run prepare_data.py --split test first")
    slices = with_neighbors(pd.read_parquet(slices_path))
    checkpoints = require_fold_checkpoints(exp_dir)
    key = outputs_key(checkpoints, test_dir, slices["image_id"])
    if not force and _reusable(exp_dir, key, checkpoints):
        log(f"{exp_dir.name}: stage-one test predictions reused ({exp_dir / 'test.parquet'}; same checkpoints, "
            "test cache and images)")
        return pd.read_parquet(exp_dir / "test.parquet")
    (exp_dir / META).unlink(missing_ok=True)  # outputs being replaced are never taken for current ones
    test_meta = read_meta(test_dir)
    t0 = time.time()
    mean, tta = 0.0, set()
    model, loaders = None, {}
    for k, path in checkpoints.items():
        model, cfg, info = load_fold_model(path, runtime)
        if runtime.wants_compile(cfg.train.compile) and not is_compiled(model):
            model.compile_backbone()
        if "image_settings" in info:
            _compare(info["image_settings"], test_meta, f"the cache {path.name} was trained on", test_dir)
        loader = split_loader(loaders, cfg, slices, test_dir, runtime, batch_size, num_workers)
        probs, emb = predict(model, loader, runtime, tta_hflip=cfg.train.tta_hflip,
                             desc=f"{exp_dir.name} fold {k} test", progress=progress)
        tta.add(cfg.train.tta_hflip)
        if getattr(model, "compile_note", None) and runtime.is_main:
            log(f"{exp_dir.name} fold {k}: {model.compile_note}")
        mean = mean + probs / len(checkpoints)
        if runtime.is_main:
            table = pd.DataFrame(probs, columns=list(LABELS))
            table.insert(0, "image_id", slices["image_id"].to_numpy())
            probs_path, emb_path = output_paths(exp_dir, k)
            save_npy_atomic(emb_path, emb)
            write_atomic(probs_path, lambda p, t=table: t.to_parquet(p, index=False))
    table = pd.DataFrame(mean, columns=list(LABELS))
    table.insert(0, "image_id", slices["image_id"].to_numpy())
    if runtime.is_main:
        write_atomic(exp_dir / "test.parquet", lambda p: table.to_parquet(p, index=False))
        write_atomic(exp_dir / META, lambda p: p.write_text(json.dumps(key, indent=1)))
        seconds = max(time.time() - t0, 1e-9)
        log(f"{exp_dir.name}: stage one on {len(slices)} test images with {len(checkpoints)} fold models "
            f"in {seconds:.0f} s ({len(slices) * len(checkpoints) / seconds:.0f} img/s per fold model"
            f"{', flip TTA' if True in tta else ''})")
    return table
