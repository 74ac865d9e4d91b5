"""Stage two and submission settings: configs/predict/*.yaml.

One file names the stage-one experiments to combine, the neighbor-feature
and LightGBM settings, and the submission's clipping; predict.py and
`python -m stacking` both read it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ich.config import ConfigError, check_fields, load_yaml, need

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
    """configs/predict/*.yaml -> a validated PredictCfg (ich.config.check_fields, then ranges).

    Everything is checked here, at load time: predict.py runs stage one on
    the whole test set before stage two reads most of these values, so a
    wrong type found later would cost that work (and show a traceback).
    """
    where = str(path)
    data = load_yaml(path)
    if "tta_hflip" in data:  # one fact, one place: the experiment config, stored in each checkpoint
        raise ConfigError(f"{path}: tta_hflip is not a predict setting any more: flip TTA is set per experiment "
                          "(train.tta_hflip in configs/<experiment>.yaml) and stored in its checkpoints, so "
                          "out-of-fold and test predictions use the same; remove the key")
    kwargs = check_fields(PredictCfg, data, where)
    kwargs.setdefault("name", Path(path).stem)
    cfg = PredictCfg(**kwargs)
    need(cfg.experiments and all(isinstance(e, str) and e for e in cfg.experiments), where,
         f"experiments must list at least one stage-one experiment name, got {cfg.experiments!r}")
    need(cfg.k_neighbors >= 0, where, f"k_neighbors must be >= 0, got {cfg.k_neighbors}")
    need(cfg.pca_components >= 0, where, f"pca_components must be >= 0, got {cfg.pca_components}")
    need(cfg.num_boost_round >= 1, where, f"num_boost_round must be >= 1, got {cfg.num_boost_round}")
    need(cfg.early_stopping_rounds >= 1, where, f"early_stopping_rounds must be >= 1, got {cfg.early_stopping_rounds}")
    need(cfg.neighbors in ("mean", "each"), where, f"neighbors must be mean or each, got {cfg.neighbors!r}")
    need(len(cfg.clip) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in cfg.clip),
         where, f"clip must be a list of two numbers [low, high], got {cfg.clip!r}")
    lo, hi = (float(v) for v in cfg.clip)
    need(0 <= lo < 0.5 < hi <= 1, where, f"clip must be [low, high] with 0 <= low < 0.5 < high <= 1, got {cfg.clip}")
    cfg.clip = [lo, hi]
    need(cfg.amp in ("auto", "bf16", "fp16", "none"), where, f"amp must be auto, bf16, fp16 or none, got {cfg.amp!r}")
    need(cfg.batch_size >= 1, where, f"batch_size must be >= 1, got {cfg.batch_size}")
    need(cfg.num_workers >= 0, where, f"num_workers must be >= 0, got {cfg.num_workers}")
    need("metric" not in cfg.lgb, where, "lgb.metric is fixed to binary_logloss (the competition's)")
    return cfg
