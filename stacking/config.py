"""Stage two and submission settings: configs/predict/*.yaml.

One file names the stage-one experiments to combine, the neighbor-feature
and LightGBM settings, and the submission's clipping; predict.py and
`python -m stacking` both read it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

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

MEMBERS = ("lightgbm", "sequence")  # stage two's members (stacking.model, stacking.sequence), blended per label

# The sequence member (stacking.sequence): sizes and training; `sequence:` in the config overrides these.
DEFAULT_SEQUENCE = {
    "hidden": 64,          # projection width and GRU state per direction
    "layers": 1,           # GRU layers
    "dropout": 0.1,
    "epochs": 40,          # at most; each member stops at its honest epoch (stacking.sequence)
    "patience": 5,         # epochs without improvement of the other folds' mean validation loss
    "optimizer": "adamw",  # stacking.sequence.OPTIMIZERS: adamw | adam
    "lr": 0.002,
    "weight_decay": 0.0001,
    "batch_size": 32,      # series per step
    "flip": False,         # train on series read either way, predict the mean of both (as the 1st place)
    "diffs": False,        # also each input's differences to the previous and next slice (as the 2nd place)
    "input_dropout": 0.0,  # share of input channels zeroed per series in training (feature dropout)
    "crop": 0,             # train on random windows of this many slices (0: whole series)
    "aux_weight": 0.0,     # weight of an auxiliary loss on a per-slice head over the projection alone
    "schedule": "early_stop",  # early_stop (honest epoch per member) | cosine (all `epochs`, lr cosine to 0)
    "seeds": 1,            # networks per member, trained side by side from other seeds, logits averaged
    "pca_components": None,  # aligned PCA components per experiment the member reads (None: pca_components)
    "device": "auto",      # auto (CUDA when torch sees one) | cpu | cuda
    "num_threads": 0,      # torch CPU threads (0: torch's default)
    "seed": 0,
}


@dataclass
class PredictCfg:
    name: str = "stack"
    experiments: list = field(default_factory=list)   # stage-one experiment names (MODEL_CHECKPOINT_DIR/<name>)
    k_neighbors: int = 5             # previous/next slices whose probabilities become features
    neighbors: str = "mean"          # several experiments: neighbor features of their mean, or of "each"
    pca_components: int = 0          # principal components of the embeddings (0: none)
    pca_alignment: str = "sign"      # sign: each fold model's own components, signs fixed; procrustes: fold
    #                                  models rotated onto each other on the test images (stacking.pca)
    pca_standardize: bool = False    # each fold model's components scaled to mean 0 / std 1 on its OOF rows
    test_embeddings: bool = False    # stage one on test keeps each fold model's embeddings (test_fold{k}_emb.npy)
    #                                  instead of their aligned PCA scores only (procrustes needs them: forced)
    lgb: dict = field(default_factory=dict)  # overrides of DEFAULT_LGB
    start_from_stage_one: bool = True  # boost from logit(mean stage-one probability): learn corrections
    num_boost_round: int = 2000
    early_stopping_rounds: int = 50  # patience on the mean validation curve of the other folds (stacking.model)
    clip: list = field(default_factory=lambda: [1e-6, 1 - 1e-6])  # submission probabilities
    members: list = field(default_factory=lambda: ["lightgbm"])  # stage two's members, blended per label
    sequence: dict = field(default_factory=dict)  # overrides of DEFAULT_SEQUENCE (with the sequence member)
    amp: str = "auto"                # stage-one test inference on CUDA: auto | bf16 | fp16 | none
    batch_size: int = 64
    num_workers: int = 2

    @property
    def lgb_params(self) -> dict:
        return {**DEFAULT_LGB, **self.lgb}

    @property
    def sequence_params(self) -> dict:
        return {**DEFAULT_SEQUENCE, **self.sequence}

    @property
    def sequence_pca_components(self) -> int:
        """The aligned PCA components per experiment the sequence member reads (sequence.pca_components;
        unset: the same as LightGBM's pca_components)."""
        c = self.sequence_params["pca_components"]
        return self.pca_components if c is None else int(c)

    @property
    def pca_width(self) -> int:
        """Components of the one PCA fitted per (experiment, stage-one fold model): as many as the widest
        reader needs. LightGBM's features take the first pca_components of them, the sequence member the
        first sequence.pca_components; the components come in order of variance, so a reader of fewer
        gets the same columns a narrower PCA would give it (sklearn's covariance solver: exactly)."""
        widths = [self.pca_components]
        if "sequence" in self.members:
            widths.append(self.sequence_pca_components)
        return max(widths)

    @property
    def keeps_test_scores(self) -> bool:
        """Stage one on test writes each fold model's aligned PCA scores (test_fold{k}_pcs.npy, float32,
        pca_width columns) instead of its embeddings: the PCA is fitted on OOF embeddings only with
        `pca_alignment: sign`, so it exists before test inference. Procrustes aligns the fold models on
        the test embeddings, so it keeps them, as `test_embeddings: true` does."""
        return bool(self.pca_width) and self.pca_alignment == "sign" and not self.test_embeddings


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
    need(cfg.pca_alignment in ("procrustes", "sign"), where,
         f"pca_alignment must be procrustes or sign, got {cfg.pca_alignment!r}")
    need(isinstance(cfg.test_embeddings, bool), where,
         f"test_embeddings must be true or false, got {cfg.test_embeddings!r}")
    need(isinstance(cfg.pca_standardize, bool), where, f"pca_standardize must be true or false, got {cfg.pca_standardize!r}")
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
    check_members(cfg, where)
    return cfg


def check_members(cfg: PredictCfg, where: str) -> None:
    """members and the sequence settings: one-line errors for unknown names, bad sizes, zero epochs."""
    need(isinstance(cfg.members, list) and cfg.members and len(set(cfg.members)) == len(cfg.members)
         and all(m in MEMBERS for m in cfg.members), where,
         f"members must list one or both of {', '.join(MEMBERS)} (each once), got {cfg.members!r}")
    need(isinstance(cfg.sequence, dict), where, f"sequence must be a mapping of settings, got {cfg.sequence!r}")
    unknown = sorted(set(cfg.sequence) - set(DEFAULT_SEQUENCE))
    need(not unknown, where, f"unknown sequence setting(s) {', '.join(map(str, unknown))}; known: "
         + ", ".join(DEFAULT_SEQUENCE))
    sp = cfg.sequence_params
    for key in ("hidden", "layers", "epochs", "patience", "batch_size", "seeds"):
        v = sp[key]
        need(isinstance(v, int) and not isinstance(v, bool) and v >= 1, where,
             f"sequence.{key} must be a whole number >= 1, got {v!r}")
    for key in ("num_threads", "seed", "crop"):
        v = sp[key]
        need(isinstance(v, int) and not isinstance(v, bool) and v >= 0, where,
             f"sequence.{key} must be a whole number >= 0, got {v!r}")
    v = sp["pca_components"]
    need(v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 0), where,
         f"sequence.pca_components must be a whole number >= 0 or null (the same as pca_components), got {v!r}")
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
    need(number(sp["lr"]) and sp["lr"] > 0, where, f"sequence.lr must be a number > 0, got {sp['lr']!r}")
    need(number(sp["weight_decay"]) and sp["weight_decay"] >= 0, where,
         f"sequence.weight_decay must be a number >= 0, got {sp['weight_decay']!r}")
    need(number(sp["dropout"]) and 0 <= sp["dropout"] < 1, where,
         f"sequence.dropout must be a number in [0, 1), got {sp['dropout']!r}")
    for key in ("flip", "diffs"):
        need(isinstance(sp[key], bool), where, f"sequence.{key} must be true or false, got {sp[key]!r}")
    for key in ("input_dropout", "aux_weight"):
        need(number(sp[key]) and 0 <= sp[key] < (1 if key == "input_dropout" else 100), where,
             f"sequence.{key} must be a number >= 0{' and < 1' if key == 'input_dropout' else ''}, got {sp[key]!r}")
    need(sp["schedule"] in ("early_stop", "cosine"), where,
         f"sequence.schedule must be early_stop or cosine, got {sp['schedule']!r}")
    need(sp["optimizer"] in ("adamw", "adam"), where,
         f"sequence.optimizer must be adamw or adam, got {sp['optimizer']!r}")
    need(sp["device"] in ("auto", "cpu", "cuda"), where,
         f"sequence.device must be auto, cpu or cuda, got {sp['device']!r}")


def apply_overrides(cfg, pairs: list[str]):
    """--set key=value: a PredictCfg field (k_neighbors, early_stopping_rounds, members, ...), a sequence
    member setting (sequence.hidden=32), or else a LightGBM param."""
    for pair in pairs:
        key, _, value = pair.partition("=")
        value = yaml.safe_load(value)
        if key.startswith("sequence."):
            cfg.sequence = {**cfg.sequence, key.split(".", 1)[1]: value}
        elif key in type(cfg).__dataclass_fields__:
            setattr(cfg, key, value)
        else:
            cfg.lgb = {**cfg.lgb, key: value}
    return cfg
