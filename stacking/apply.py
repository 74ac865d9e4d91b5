"""Stage two on new slices with what predict.py saved: no training, the same function as the batch path.

predict.py trains the boosters and predicts the test set in one go. A new
study (or a rerun on another test set) needs the trained stage two applied
as it is: per stage-one fold model k, its outputs on the new slices
(`test_fold{k}.parquet` / `test_fold{k}_emb.npy`, written by
pipeline.batch.stage_one_test, file names in ich.stage_one), the PCA fitted on that model's OOF embeddings
(saved in `stage_two.joblib`), the same neighbor features, booster k of
each label (`boosters/<label>_fold<k>.txt`, n_k rounds), started from
logit(mean stage-one probability of fold model k), and sequence member k
(`sequence.pt`) on the same view; each member's mean over k; then the
per-label blend saved with them. That is stacking.run's test path step by
step, and a test holds the two equal.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ich.labels import LABELS

from . import blend
from .config import PredictCfg
from .features import build_features, series_inputs
from .model import logit, predict_booster
from .saved import load_saved
from .stage_one import StackingError, StageOne, fold_model_view, mean_probs, view_of


class SavedStageTwo:
    """A trained stage two, loaded once (boosters, aligned PCAs, sequence members, blend weights) and
    applied to any slices: the in-memory engine (pipeline.engine) holds one for its life."""

    def __init__(self, cfg: PredictCfg, model_dir: Path):
        self.cfg = cfg
        self.saved, self.boosters, self.members = load_saved(cfg, model_dir)

    @property
    def folds(self) -> list[int]:
        return [int(k) for k in self.saved["folds"]]

    def view(self, k: int, outputs: dict) -> StageOne:
        """Fold model k's in-memory outputs ({experiment: (probabilities, embeddings)}) -> its stage-two view."""
        return view_of(self.cfg, outputs, k, self.saved["pca"])

    def apply(self, slices: pd.DataFrame, views) -> pd.DataFrame:
        """Stage-two probabilities of `slices` (image_id + six labels, slices' row order); views(k): fold
        model k's StageOne on those rows. Each member's mean over fold-model pairings, then the blend."""
        cfg, saved = self.cfg, self.saved
        folds = self.folds
        total = {name: np.zeros((len(slices), len(LABELS))) for name in saved["members"]}
        for k in folds:
            view = views(k)
            base = mean_probs(view) if cfg.start_from_stage_one else None
            if self.boosters:
                X, names = build_features(slices, view.probs, k=cfg.k_neighbors,
                                          embeddings=view.first_pcs(cfg.pca_components) or None,
                                          neighbors=cfg.neighbors)
                if names != saved["feature_names"]:
                    raise StackingError("these slices give other stage-two features than training did ("
                                        + ", ".join(sorted(set(names) ^ set(saved["feature_names"]))[:5])
                                        + "): prepare them with the same prepare_data.py")
                init = None if base is None else logit(base)
                for j, label in enumerate(LABELS):
                    total["lightgbm"][:, j] += predict_booster(self.boosters[label, k], X, None,
                                                               None if init is None else init[:, j]) / len(folds)
            if self.members:
                from .sequence import apply_member
                inputs = series_inputs(slices, view.probs, view.first_pcs(cfg.sequence_pca_components))
                total["sequence"] += apply_member(self.members[k], saved["sequence_params"], slices, inputs,
                                                  base) / len(folds)
        out = pd.DataFrame(blend.apply(saved["blend_weights"], total), columns=list(LABELS))
        out.insert(0, "image_id", slices["image_id"].to_numpy())
        return out


def apply_stage_two(cfg: PredictCfg, model_dir: Path, slices: pd.DataFrame) -> pd.DataFrame:
    """Stage two on `slices` from the per-fold-model outputs predict.py wrote for them
    (MODEL_CHECKPOINT_DIR/<experiment>/test_fold{k}.*, written by pipeline.batch.stage_one_test):
    `SavedStageTwo.apply`."""
    stage_two = SavedStageTwo(cfg, model_dir)
    return stage_two.apply(slices, lambda k: fold_model_view(cfg, model_dir, slices, k, stage_two.saved["pca"]))
