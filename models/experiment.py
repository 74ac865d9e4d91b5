"""train.py's work: every requested fold of one experiment, then the OOF files.

Outputs in MODEL_CHECKPOINT_DIR/<experiment>/ (ARCHITECTURE.md, contract 2):
- fold{k}.pt: the kept weights (train.checkpoint) + config; fold{k}.last.pt: resume state;
- fold{k}.oof.parquet / fold{k}.oof_emb.npy: the kept model's held-out predictions;
- fold{k}.oof_last.parquet: the last epoch's held-out predictions (the same
  file's content when the last epoch is the kept one);
- oof.parquet (image_id + six probabilities, every train image exactly once,
  in slices.parquet order) and oof_emb.npy (float16 pooled embeddings, rows
  aligned), written once every fold is done; oof_last.parquet likewise.
The OOF score of `train.checkpoint: best` is selected on the fold it scores,
so it is optimistic; the log labels it so and prints the last epoch's OOF
score beside it, which nothing was chosen on.
Logs in LOGS_DIR/<experiment>/: history.csv and training_curves.png.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

from ich import provenance
from ich.cache import read_meta, save_npy_atomic, write_atomic
from ich.dicom_rows import has_images, open_rows
from ich.rawdata import RawDataError
from ich.labels import LABELS
from ich.metric import per_label_log_loss, prior_baseline, weighted_log_loss
from ich.stage_one import fold_checkpoint

from . import plots
from .checkpoint import CheckpointError, read
from .config import ExperimentCfg
from .data import with_neighbors
from .inference import make_loader, predict
from .net import weights_file
from .runtime import Runtime
from .trainer import FoldData, make_dataset, train_fold


class TrainError(RuntimeError):
    """train.py cannot go on; the message says what to do."""


def load_train_table(clean_dir: Path) -> pd.DataFrame:
    path = clean_dir / "slices.parquet"
    if not path.is_file():
        raise TrainError(f"{path} not found: run prepare_data.py first")
    slices = pd.read_parquet(path)
    missing = [c for c in ("fold", "cache_row", *LABELS) if c not in slices]
    if missing:
        raise TrainError(f"{path} lacks columns {missing}: is it the train split?")
    return with_neighbors(slices)


def upsampling_warning(cfg: ExperimentCfg, clean_dir: Path) -> str | None:
    """A warning when the network input is larger than the cached images.

    Upsampling a 256-px cache to 512 px costs 4x the compute and adds no
    detail; the cure is a cache at least as large (configs/prepare/512.yaml),
    which every experiment can share: a larger cache is shrunk per image.
    """
    meta = read_meta(clean_dir) or {}
    cache = meta.get("image_size")
    sizes = [int(s) for s, _ in cfg.input.progressive or []] + [cfg.final_size]
    if cache and max(sizes) > cache:
        return (f"warning: {cfg.name} trains at up to {max(sizes)} px but the image cache in {clean_dir} is "
                f"{cache} px: images are upsampled, which costs compute and adds no detail. Prepare a cache "
                f">= {max(sizes)} px (configs/prepare/512.yaml) or lower input.size.")
    return None


def stage_one_images(cfg: ExperimentCfg, clean_dir: Path, raw_dir: Path | None, slices: pd.DataFrame):
    """Where the experiment's images come from (input.source): None for the image cache in clean_dir, or
    the DICOMs of RAW_DATA_DIR (a folder or the zip) read in the loader workers (ich.dicom_rows)."""
    if cfg.input.source == "cache":
        if not has_images(clean_dir):
            raise TrainError(f"{clean_dir} holds no image cache (prepared with images: false): set input.source: "
                             f"dicom in {cfg.name}'s config, or prepare the train split with images: true")
        return None
    if raw_dir is None:
        raise TrainError("input.source: dicom reads RAW_DATA_DIR, which was not given")
    try:
        return open_rows(clean_dir, raw_dir, slices)
    except RawDataError as exc:
        raise TrainError(str(exc)) from None


FOLD_FILES = ("fold{k}.pt", "fold{k}.last.pt", "fold{k}.oof.parquet", "fold{k}.oof_emb.npy",
              "fold{k}.oof_last.parquet")


def fold_done(out_dir: Path, k: int) -> bool:
    return all((out_dir / name.format(k=k)).is_file()
               for name in ("fold{k}.pt", "fold{k}.oof.parquet", "fold{k}.oof_last.parquet"))


def run_experiment(cfg: ExperimentCfg, *, clean_dir: Path, model_dir: Path, logs_dir: Path, runtime: Runtime,
                   folds: list[int] | None = None, resume: bool = False, force: bool = False,
                   progress: bool = True, log=print, raw_dir: Path | None = None) -> dict:
    """raw_dir: RAW_DATA_DIR, read when the config's input.source is dicom."""
    slices = load_train_table(clean_dir)
    images = stage_one_images(cfg, clean_dir, raw_dir, slices)
    all_folds = sorted(int(f) for f in slices["fold"].unique())
    if cfg.train.n_folds is not None:
        all_folds = all_folds[: cfg.train.n_folds]
    folds = all_folds if folds is None else folds
    bad = sorted(set(folds) - set(all_folds))
    if bad:
        raise TrainError(f"fold(s) {bad} do not exist; slices.parquet has folds {all_folds}")
    if cfg.sampler.min_brain_fraction > 0 and "brain_fraction" not in slices:
        raise TrainError(f"sampler.min_brain_fraction needs the brain_fraction column, which {clean_dir} / "
                         "slices.parquet lacks: rerun prepare_data.py --force, or set it to 0")
    if cfg.model.pretrained:  # before any output is written, not when the first fold builds its network
        weights_file(cfg.model.pretrained)
    warning = upsampling_warning(cfg, clean_dir)
    if warning and runtime.is_main:
        log(warning)
    out_dir, log_dir = model_dir / cfg.name, logs_dir / cfg.name
    started = [k for k in folds if (out_dir / f"fold{k}.last.pt").is_file() or fold_done(out_dir, k)]
    if started and not (resume or force):
        raise TrainError(f"{out_dir} already has fold(s) {started}: pass --resume to continue "
                         "(finished folds are skipped) or --force to retrain them from scratch")
    if runtime.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        log_dir.mkdir(parents=True, exist_ok=True)
        if force:
            for k in folds:
                for name in FOLD_FILES:
                    (out_dir / name.format(k=k)).unlink(missing_ok=True)
            for name in ("oof.parquet", "oof_emb.npy", "oof_last.parquet"):
                (out_dir / name).unlink(missing_ok=True)
        (out_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
    runtime.barrier()

    for k in folds:
        if fold_done(out_dir, k):
            log(f"fold {k}: done already, skipped")
            continue
        t0 = time.time()
        data = FoldData(train=slices[slices["fold"] != k], valid=slices[slices["fold"] == k], clean_dir=clean_dir,
                        images=images)
        try:
            model, history = train_fold(cfg, k, data, out_dir, runtime, resume=resume, progress=progress, log=log)
            kept = read(fold_checkpoint(out_dir, k), runtime.device)
        except CheckpointError as exc:
            raise TrainError(str(exc)) from None
        valid_set = make_dataset(cfg, data.valid, clean_dir, cfg.final_size, train=False, images=images)
        loader = make_loader(valid_set, runtime, cfg.train.batch_size * 2, cfg.train.num_workers)

        def held_out(desc):
            return predict(model, loader, runtime, tta_hflip=cfg.train.tta_hflip, desc=desc, progress=progress)

        last_probs, emb = held_out(f"fold {k} oof (last epoch)")
        probs = last_probs
        if kept["epoch"] != cfg.train.epochs:  # train.checkpoint: best kept an earlier epoch
            model.load_state_dict(kept["state_dict"])
            probs, emb = held_out(f"fold {k} oof (epoch {kept['epoch']})")
        if runtime.is_main:
            ids = data.valid["image_id"].to_numpy()
            save_npy_atomic(out_dir / f"fold{k}.oof_emb.npy", emb)
            for name, p in ((f"fold{k}.oof_last.parquet", last_probs), (f"fold{k}.oof.parquet", probs)):
                piece = pd.DataFrame(p, columns=list(LABELS))
                piece.insert(0, "image_id", ids)
                write_atomic(out_dir / name, lambda tmp, piece=piece: piece.to_parquet(tmp, index=False))
            history.to_csv(log_dir / f"fold{k}_history.csv", index=False)
            y = data.valid[list(LABELS)].to_numpy()
            tta = " with flip TTA" if cfg.train.tta_hflip else ""
            if kept["epoch"] == cfg.train.epochs:
                log(f"fold {k}: out-of-fold weighted log loss {weighted_log_loss(y, probs):.4f}{tta}, last epoch "
                    f"({time.time() - t0:.0f} s)")
            else:
                log(f"fold {k}: out-of-fold weighted log loss {weighted_log_loss(y, probs):.4f}{tta}, epoch "
                    f"{kept['epoch']} selected on this fold (optimistic); last epoch "
                    f"{weighted_log_loss(y, last_probs):.4f} ({time.time() - t0:.0f} s)")
        runtime.barrier()

    result = {"out_dir": out_dir, "complete": all(fold_done(out_dir, k) for k in all_folds)}
    if runtime.is_main:
        histories = {k: pd.read_csv(log_dir / f"fold{k}_history.csv") for k in all_folds
                     if (log_dir / f"fold{k}_history.csv").is_file()}
        if histories:
            pd.concat(histories.values()).to_csv(log_dir / "history.csv", index=False)
            result["curves"] = plots.training_curves(histories, log_dir / "training_curves.png", cfg.name)
        if result["complete"]:
            made_by = provenance.record(cfg.to_dict(), runtime.describe(), clean_dir)
            result.update(assemble_oof(slices, out_dir, all_folds, made_by))
            how = ("last epochs" if cfg.train.checkpoint == "last" else
                   f"best epochs, selected on the scored folds (optimistic; last epochs {result['oof_last']:.4f})")
            log(f"OOF weighted log loss {result['oof']:.4f} ({how}) vs prior baseline {result['prior']:.4f} "
                f"({len(slices)} images, {len(all_folds)} folds) -> {out_dir / 'oof.parquet'}")
    return result


def assemble_oof(slices: pd.DataFrame, out_dir: Path, folds: list[int], made_by: dict | None = None) -> dict:
    """Join the fold pieces into oof.parquet / oof_emb.npy / oof_last.parquet in slices.parquet order,
    the reproducibility record `made_by` (ich.provenance) in the parquet files' metadata."""
    oof = pd.concat([pd.read_parquet(out_dir / f"fold{k}.oof.parquet") for k in folds], ignore_index=True)
    last = pd.concat([pd.read_parquet(out_dir / f"fold{k}.oof_last.parquet") for k in folds], ignore_index=True)
    emb = np.concatenate([np.load(out_dir / f"fold{k}.oof_emb.npy") for k in folds])
    position = pd.Series(np.arange(len(oof)), index=oof["image_id"])
    if not position.index.is_unique or set(position.index) != set(slices["image_id"]) or not (
            last["image_id"].to_numpy() == oof["image_id"].to_numpy()).all():
        raise TrainError("fold pieces do not cover every train image exactly once: rerun with --force")
    order = position.loc[slices["image_id"]].to_numpy()
    oof, last, emb = oof.iloc[order].reset_index(drop=True), last.iloc[order].reset_index(drop=True), emb[order]
    save_npy_atomic(out_dir / "oof_emb.npy", emb)
    provenance.write_parquet(oof, out_dir / "oof.parquet", made_by or {})
    provenance.write_parquet(last, out_dir / "oof_last.parquet", made_by or {})
    y = slices[list(LABELS)].to_numpy()
    p = oof[list(LABELS)].to_numpy()
    prior = np.zeros_like(p)
    for k in folds:  # each fold's prior comes from its own training folds, like the model
        held = (slices["fold"] == k).to_numpy()
        prior[held] = prior_baseline(y[~held], int(held.sum()))
    return {"oof": weighted_log_loss(y, p), "prior": weighted_log_loss(y, prior),
            "oof_last": weighted_log_loss(y, last[list(LABELS)].to_numpy()),
            "oof_per_label": dict(zip(LABELS, per_label_log_loss(y, p))), "n_images": len(slices)}
