"""Stage two and submission settings: configs/predict/*.yaml.

One file names the stage-one experiments to combine, the neighbor-feature
and LightGBM settings, and the submission's clipping; predict.py and
`python -m stacking` both read it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ich.config import ConfigError, load_yaml

DEFAULT_LGB = {
    "objective": "binary",
    "learning_rate": 0.05,
    "num_leaves": 31,
    "min_data_in_leaf": 100,
    "feature_fraction": 0.5,
    "bagging_fraction": 0.7,
    "bagging_freq": 1,
    "lambda_l2": 1.0,
    "max_bin": 63,
    "num_threads": 0,
    "verbose": -1,
    "seed": 0,
}


@dataclass
class PredictCfg:
    name: str = "stack"
    experiments: list = field(default_factory=list)   # stage-one experiment names (MODEL_CHECKPOINT_DIR/<name>)
    k_neighbors: int = 5             # previous/next slices whose probabilities become features
    neighbors: str = "mean"          # several experiments: neighbor features of their mean, or of "each"
    pca_components: int = 0          # principal components of the embeddings (0: none)
    lgb: dict = field(default_factory=dict)  # overrides of DEFAULT_LGB
    start_from_stage_one: bool = True  # boost from logit(mean stage-one probability): learn corrections
    num_boost_round: int = 2000
    early_stopping_rounds: int = 50  # patience on the mean validation curve of the other folds (stacking.model)
    clip: list = field(default_factory=lambda: [1e-6, 1 - 1e-6])  # submission probabilities
    amp: str = "auto"                # stage-one test inference on CUDA: auto | bf16 | fp16 | none
    batch_size: int = 64
    num_workers: int = 2

    @property
    def lgb_params(self) -> dict:
        return {**DEFAULT_LGB, **self.lgb}


def load_predict_config(path: str | Path) -> PredictCfg:
    data = load_yaml(path)
    if "tta_hflip" in data:  # one fact, one place: the experiment config, stored in each checkpoint
        raise ConfigError(f"{path}: tta_hflip is not a predict setting any more: flip TTA is set per experiment "
                          "(train.tta_hflip in configs/<experiment>.yaml) and stored in its checkpoints, so "
                          "out-of-fold and test predictions use the same; remove the key")
    known = set(PredictCfg.__dataclass_fields__)
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    data.setdefault("name", Path(path).stem)
    cfg = PredictCfg(**data)
    if not cfg.experiments or not all(isinstance(e, str) for e in cfg.experiments):
        raise ConfigError(f"{path}: experiments must list at least one stage-one experiment name")
    if cfg.k_neighbors < 0 or cfg.pca_components < 0:
        raise ConfigError(f"{path}: k_neighbors and pca_components must be >= 0")
    if cfg.num_boost_round < 1 or cfg.early_stopping_rounds < 1:
        raise ConfigError(f"{path}: num_boost_round and early_stopping_rounds must be >= 1")
    if cfg.neighbors not in ("mean", "each"):
        raise ConfigError(f"{path}: neighbors must be mean or each")
    lo, hi = (float(v) for v in cfg.clip)
    if not 0 <= lo < 0.5 < hi <= 1:
        raise ConfigError(f"{path}: clip must be [low, high] with 0 <= low < 0.5 < high <= 1")
    cfg.clip = [lo, hi]
    if cfg.amp not in ("auto", "bf16", "fp16", "none"):
        raise ConfigError(f"{path}: amp must be auto, bf16, fp16 or none")
    unknown_lgb = {"metric"} & set(cfg.lgb)
    if unknown_lgb:
        raise ConfigError(f"{path}: lgb.metric is fixed to binary_logloss (the competition's)")
    return cfg
