"""The saved stage two: one format, written by stacking.run and read by stacking.apply.

MODEL_CHECKPOINT_DIR/stacking/<name>/ holds stage_two.joblib (feature names,
folds, each fold model's aligned PCA, rounds, members, blend weights),
boosters/<label>_fold<k>.txt (n_k rounds each, LightGBM member),
sequence.pt (the sequence members, torch) and config.json.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import joblib
import lightgbm as lgb

from ich.cache import write_atomic
from ich.labels import LABELS

from .config import PredictCfg
from .stage_one import StackingError

SAVED = "stage_two.joblib"  # what stacking.apply needs besides the boosters: per-fold-model PCAs, feature names
SAVED_VERSION = 3            # 2: aligned PCAs, members and blend weights; 3: weights of the shrunk nested blend
SEQUENCE_SAVED = "sequence.pt"  # the sequence members (torch), beside SAVED


def write_saved(out_dir: Path, cfg: PredictCfg, *, feature_names: list, folds: list, pca: dict, members: list,
                blend_weights, lightgbm=None, sequence=None) -> None:
    """Everything `load_saved` reads back. lightgbm: stacking.model.StackResult (boosters at n_k rounds);
    sequence: stacking.sequence.SequenceResult (one member per fold)."""
    (out_dir / "boosters").mkdir(parents=True, exist_ok=True)
    for old in (out_dir / "boosters").glob("*.txt"):  # a rerun with other folds or without LightGBM
        old.unlink()
    if lightgbm is not None:
        for (label, k), booster in lightgbm.boosters.items():
            booster.save_model(str(out_dir / "boosters" / f"{label}_fold{k}.txt"),
                               num_iteration=lightgbm.rounds[(label, k)])
    if sequence is not None:
        import torch
        write_atomic(out_dir / SEQUENCE_SAVED, lambda p: torch.save(
            {"members": {k: dataclasses.asdict(m) for k, m in sequence.members.items()},
             "params": cfg.sequence_params}, p))
    (out_dir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
    saved = {"version": SAVED_VERSION, "feature_names": feature_names, "folds": folds, "pca": pca,
             "rounds": lightgbm.rounds if lightgbm is not None else {}, "members": members,
             "blend_weights": blend_weights}
    write_atomic(out_dir / SAVED, lambda p: joblib.dump(saved, p))


def load_saved(cfg: PredictCfg, model_dir: Path) -> tuple[dict, dict, dict]:
    """What predict.py saved of a trained stage two: (feature names / folds / PCAs / members / blend
    weights, {(label, k): booster} (LightGBM member), {k: sequence member} (sequence member))."""
    out_dir = model_dir / "stacking" / cfg.name
    if not (out_dir / SAVED).is_file():
        raise StackingError(f"{out_dir / SAVED} not found: run predict.py with this config first (it trains "
                            "stage two and saves it there)")
    saved = joblib.load(out_dir / SAVED)
    if saved.get("version") != SAVED_VERSION:
        raise StackingError(f"{out_dir / SAVED} was saved by an older version of stage two: rerun predict.py "
                            "with this config")
    if saved["members"] != list(cfg.members):
        raise StackingError(f"{out_dir / SAVED} holds the members {saved['members']}, the config lists "
                            f"{cfg.members}: rerun predict.py with this config")
    boosters, members = {}, {}
    if "lightgbm" in saved["members"]:
        for label in LABELS:
            for k in saved["folds"]:
                path = out_dir / "boosters" / f"{label}_fold{k}.txt"
                if not path.is_file():
                    raise StackingError(f"{path} not found: rerun predict.py with this config")
                boosters[label, k] = lgb.Booster(model_file=str(path))
    if "sequence" in saved["members"]:
        import torch

        from .sequence import Member
        path = out_dir / SEQUENCE_SAVED
        if not path.is_file():
            raise StackingError(f"{path} not found: rerun predict.py with this config")
        stored = torch.load(path, map_location="cpu", weights_only=False)
        members = {int(k): Member(**m) for k, m in stored["members"].items()}
        saved["sequence_params"] = stored["params"]
    return saved, boosters, members
