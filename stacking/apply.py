"""Stage two on new slices with what predict.py saved: no training, the same function as the batch path.

predict.py trains the boosters and predicts the test set in one go. A new
study (or a rerun on another test set) needs the trained stage two applied
as it is: per stage-one fold model k, its outputs on the new slices
(`test_fold{k}.parquet` / `test_fold{k}_emb.npy`, written by
models.predict_split), the PCA fitted on that model's OOF embeddings
(saved in `stage_two.joblib`), the same neighbor features, booster k of
each label (`boosters/<label>_fold<k>.txt`, n_k rounds), started from
logit(mean stage-one probability of fold model k); the mean over k. That is
stacking.model.fit_predict's test path step by step, and a test holds the
two equal.
"""
from __future__ import annotations

from pathlib import Path

import joblib
import lightgbm as lgb
import numpy as np
import pandas as pd

from ich.labels import LABELS

from .config import PredictCfg
from .features import build_features
from .model import logit, predict_booster
from .run import SAVED, StackingError, fold_model_view


def load_saved(cfg: PredictCfg, model_dir: Path) -> tuple[dict, dict]:
    """(saved feature names / folds / PCAs, {(label, k): booster}) of a stage two that predict.py trained."""
    out_dir = model_dir / "stacking" / cfg.name
    if not (out_dir / SAVED).is_file():
        raise StackingError(f"{out_dir / SAVED} not found: run predict.py with this config first (it trains "
                            "stage two and saves it there)")
    saved = joblib.load(out_dir / SAVED)
    boosters = {}
    for label in LABELS:
        for k in saved["folds"]:
            path = out_dir / "boosters" / f"{label}_fold{k}.txt"
            if not path.is_file():
                raise StackingError(f"{path} not found: rerun predict.py with this config")
            boosters[label, k] = lgb.Booster(model_file=str(path))
    return saved, boosters


def apply_stage_two(cfg: PredictCfg, model_dir: Path, slices: pd.DataFrame) -> pd.DataFrame:
    """Stage-two probabilities of `slices` (image_id + six labels, slices' row order).

    Reads each experiment's per-fold-model outputs on these slices from
    MODEL_CHECKPOINT_DIR/<experiment>/test_fold{k}.* (models.predict_split
    writes them for any test clean dir).
    """
    saved, boosters = load_saved(cfg, model_dir)
    total = np.zeros((len(slices), len(LABELS)))
    for k in saved["folds"]:
        view = fold_model_view(cfg, model_dir, slices, k, saved["pca"])
        X, names = build_features(slices, view.probs, k=cfg.k_neighbors, embeddings=view.pcs or None,
                                  neighbors=cfg.neighbors)
        if names != saved["feature_names"]:
            raise StackingError("these slices give other stage-two features than training did ("
                                + ", ".join(sorted(set(names) ^ set(saved["feature_names"]))[:5])
                                + "): prepare them with the same prepare_data.py")
        init = logit(np.mean(list(view.probs.values()), axis=0)) if cfg.start_from_stage_one else None
        for j, label in enumerate(LABELS):
            total[:, j] += predict_booster(boosters[label, k], X, None, None if init is None else init[:, j])
    out = pd.DataFrame(total / len(saved["folds"]), columns=list(LABELS))
    out.insert(0, "image_id", slices["image_id"].to_numpy())
    return out
