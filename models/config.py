"""Stage-one experiment configs: one YAML file per experiment in configs/.

The file is the whole experiment: backbone, input, augmentations, loss,
sampler, optimizer, schedule and run settings. Sections and keys map to the
dataclasses below; an unknown key is an error (a typo must not silently fall
back to a default), and so is a value of the wrong type.
"""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path

from ich.config import ConfigError, check_fields, load_yaml


@dataclass
class ModelCfg:
    backbone: str = "resnet18"       # any timm model name
    pretrained: str | None = None    # local weights file (.pth/.bin/.safetensors); None = random init
    dropout: float = 0.0             # before the linear head


@dataclass
class InputCfg:
    mode: str = "windows"            # windows: the cached windows of one slice
    #                                  adjacent: one window on slices i-1, i, i+1
    #                                  adjacent_windows: every window of slices i-1, i, i+1 (9 channels)
    adjacent_channel: int = 0        # adjacent mode: which cached window (0 = brain by default)
    size: int = 256                  # training and inference size (cache images are resized when different)
    progressive: list | None = None  # [[size, epochs], ...]: progressive resizing; epochs must add up to train.epochs
    source: str = "cache"            # cache: the image cache (images.npy) | dicom: each slice read from RAW_DATA_DIR's
    #                                  DICOMs (folder or zip) in the loader workers, prepare_data's own reading and
    #                                  the clean dir's image settings: no image cache needed (ich.dicom_rows)


@dataclass
class AugmentCfg:
    hflip: float = 0.5               # probability
    shift_scale_rotate: float = 0.5  # probability of an affine jitter with the limits below
    shift_limit: float = 0.0625      # fraction of the image size
    scale_limit: float = 0.1
    rotate_limit: float = 15.0       # degrees
    transpose: float = 0.0
    blur: float = 0.0
    blur_limit: int = 3
    contrast: float = 0.0            # probability of brightness/contrast jitter
    contrast_limit: float = 0.2
    erasing: float = 0.0             # probability of random erasing (CoarseDropout)
    erasing_holes: int = 4
    erasing_size: float = 0.2        # max hole side, fraction of the image size
    erasing_on: str = "negatives"    # negatives: never erase on a slice labelled `any` (a hole can hide a small
                                     # lesion whose label stays positive); all: every slice


@dataclass
class LossCfg:
    any_weight: float = 2.0          # the metric's weight on `any`
    pos_weight: bool = False         # weight positives by each label's negative/positive ratio (hurts calibration)


@dataclass
class SamplerCfg:
    kind: str = "all"                # all | balanced (every positive + neg_ratio x as many random negatives per epoch)
    neg_ratio: float = 1.0
    min_brain_fraction: float = 0.0  # train on slices with at least this share of brain pixels (0-80 HU) only;
    #                                  validation, OOF and test still cover every slice (models.data.EpochSampler)


# The choices of optim.name and optim.schedule. models/optim.py maps each to its constructor (OPTIMIZERS,
# SCHEDULES, the same names in the same order: tests/test_optim.py); listed here so that this module
# needs no torch and models.optim can import OptimCfg without an import cycle.
OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULES = ("cosine", "onecycle", "step")


@dataclass
class OptimCfg:
    name: str = "adamw"              # adamw | adam | sgd (models.optim.OPTIMIZERS); fused on CUDA (adamw, adam)
    lr: float = 1e-3
    weight_decay: float = 1e-4
    momentum: float = 0.9            # sgd only
    nesterov: bool = False           # sgd only
    schedule: str = "cosine"         # cosine | onecycle | step (models.optim.SCHEDULES)
    warmup_epochs: float = 0.0       # cosine: linear warm-up length
    step_epochs: int = 2             # step: decay every this many epochs
    step_gamma: float = 0.3


@dataclass
class TrainCfg:
    epochs: int = 3
    batch_size: int = 32
    accumulate: int = 1              # gradient accumulation steps
    amp: str = "auto"                # auto (bf16 where supported, else fp16) | bf16 | fp16 | none; CUDA only
    channels_last: bool = True       # CUDA only
    freeze_epochs: int = 0           # epochs with the backbone frozen (head warm-up)
    num_workers: int = 2
    seed: int = 0
    tta_hflip: bool = True           # flip TTA for out-of-fold and test predictions (stored in each checkpoint)
    compile: str = "auto"            # auto (on CUDA) | true | false: torch.compile the backbone (train, OOF, test)
    checkpoint: str = "last"         # last | best: the epoch each fold keeps (best: chosen on the held-out fold,
    #                                  among epochs at the final size; its OOF is then optimistic, and logged so)
    n_folds: int | None = None       # None: every fold in slices.parquet
    average_last: int = 1            # fold{k}.pt = the mean of the last N epochs' weights, BatchNorm statistics
    #                                  recomputed (models.trainer.recompute_batchnorm); 1: the last epoch's weights


@dataclass
class ExperimentCfg:
    name: str = "experiment"
    model: ModelCfg = field(default_factory=ModelCfg)
    input: InputCfg = field(default_factory=InputCfg)
    augment: AugmentCfg = field(default_factory=AugmentCfg)
    loss: LossCfg = field(default_factory=LossCfg)
    sampler: SamplerCfg = field(default_factory=SamplerCfg)
    optim: OptimCfg = field(default_factory=OptimCfg)
    train: TrainCfg = field(default_factory=TrainCfg)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def size_at(self, epoch: int) -> int:
        """Image size for an epoch (progressive resizing), the final size past the end."""
        if not self.input.progressive:
            return self.input.size
        done = 0
        for size, epochs in self.input.progressive:
            done += epochs
            if epoch < done:
                return int(size)
        return int(self.input.progressive[-1][0])

    @property
    def final_size(self) -> int:
        return self.size_at(self.train.epochs - 1)


SECTIONS = {"model": ModelCfg, "input": InputCfg, "augment": AugmentCfg, "loss": LossCfg,
            "sampler": SamplerCfg, "optim": OptimCfg, "train": TrainCfg}


def from_dict(data: dict, where: str = "config") -> ExperimentCfg:
    """A config mapping (a YAML file, a checkpoint's stored config) -> a validated ExperimentCfg.

    Each section's keys are type-checked against its dataclass by
    ich.config.check_fields (the routine every config kind uses), then
    _validate checks ranges and the backbone name.
    """
    unknown = sorted(set(data) - set(SECTIONS) - {"name"})
    if unknown:
        raise ConfigError(f"{where}: unknown section(s) {', '.join(unknown)}; known: name, {', '.join(SECTIONS)}")
    kwargs = {"name": str(data.get("name", "experiment"))}
    train = data.get("train")
    if isinstance(train, dict) and isinstance(train.get("compile"), bool):  # YAML reads true/false as booleans
        data = {**data, "train": {**train, "compile": str(train["compile"]).lower()}}
    for section, cls in SECTIONS.items():
        kwargs[section] = cls(**check_fields(cls, data.get(section) or {}, where, section=section))
    cfg = ExperimentCfg(**kwargs)
    _validate(cfg, where)
    return cfg


def check_backbone(name: str, where: str) -> None:
    """model.backbone must be a model the installed timm can build.

    Checked at load time: otherwise train.py would create the output folders
    and write config.json, and fail only when the network is built.
    """
    import timm  # here, not at module level: loading a config should not cost a timm import elsewhere
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else "; timm.list_models() lists them"
        raise ConfigError(f"{where}: model.backbone {name!r} is not a timm model (timm {timm.__version__}){hint}")


def _validate(cfg: ExperimentCfg, where: str) -> None:
    def need(ok, message):
        if not ok:
            raise ConfigError(f"{where}: {message}")
    need(cfg.input.mode in ("windows", "adjacent", "adjacent_windows"),
         "input.mode must be windows, adjacent or adjacent_windows")
    need(cfg.input.source in ("cache", "dicom"), f"input.source must be cache or dicom, got {cfg.input.source!r}")
    need(cfg.sampler.kind in ("all", "balanced"), "sampler.kind must be all or balanced")
    need(cfg.augment.erasing_on in ("negatives", "all"),
         f"augment.erasing_on must be negatives or all, got {cfg.augment.erasing_on!r}")
    need(cfg.optim.name in OPTIMIZERS, f"optim.name must be one of {', '.join(OPTIMIZERS)}, got {cfg.optim.name!r}")
    need(cfg.optim.schedule in SCHEDULES,
         f"optim.schedule must be one of {', '.join(SCHEDULES)}, got {cfg.optim.schedule!r}")
    need(0 <= cfg.optim.momentum < 1, f"optim.momentum must be in [0, 1), got {cfg.optim.momentum}")
    need(not cfg.optim.nesterov or cfg.optim.momentum > 0, "optim.nesterov needs optim.momentum > 0")
    need(cfg.train.amp in ("auto", "none", "bf16", "fp16"), "train.amp must be auto, none, bf16 or fp16")
    need(cfg.train.checkpoint in ("last", "best"), "train.checkpoint must be last or best")
    need(cfg.train.compile in ("auto", "true", "false"), "train.compile must be auto, true or false")
    need(cfg.sampler.neg_ratio > 0, "sampler.neg_ratio must be > 0")
    need(0 <= cfg.sampler.min_brain_fraction < 1,
         f"sampler.min_brain_fraction must be in [0, 1), got {cfg.sampler.min_brain_fraction}")
    need(1 <= cfg.train.average_last <= cfg.train.epochs,
         f"train.average_last must be between 1 and train.epochs ({cfg.train.epochs}), got {cfg.train.average_last}")
    need(cfg.train.average_last == 1 or cfg.train.checkpoint == "last",
         "train.average_last > 1 averages the last epochs: it needs train.checkpoint: last")
    need(cfg.train.epochs >= 1 and cfg.train.batch_size >= 1 and cfg.train.accumulate >= 1,
         "train.epochs, train.batch_size and train.accumulate must be >= 1")
    need(cfg.train.num_workers >= 0, f"train.num_workers must be >= 0, got {cfg.train.num_workers}")
    need(cfg.train.n_folds is None or cfg.train.n_folds >= 1, f"train.n_folds must be >= 1, got {cfg.train.n_folds}")
    need(0 <= cfg.train.freeze_epochs < cfg.train.epochs or cfg.train.freeze_epochs == 0,
         "train.freeze_epochs must be smaller than train.epochs")
    need(cfg.optim.lr > 0, f"optim.lr must be > 0, got {cfg.optim.lr}")
    need(0 <= cfg.model.dropout < 1, f"model.dropout must be in [0, 1), got {cfg.model.dropout}")
    need(cfg.input.size >= 16, "input.size must be >= 16")
    if cfg.input.progressive:
        try:
            pairs = [(int(s), int(e)) for s, e in cfg.input.progressive]
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: input.progressive must be a list of [size, epochs] pairs") from None
        need(sum(e for _, e in pairs) == cfg.train.epochs,
             f"input.progressive epochs add up to {sum(e for _, e in pairs)}, train.epochs is {cfg.train.epochs}")
        cfg.input.progressive = [list(p) for p in pairs]
    need(cfg.size_at(cfg.train.epochs - cfg.train.average_last) == cfg.final_size,
         f"train.average_last {cfg.train.average_last} reaches back to an epoch before the final input size "
         f"{cfg.final_size}: weights of epochs at other sizes are not averaged")
    check_backbone(cfg.model.backbone, where)


def load_experiment(path: str | Path) -> ExperimentCfg:
    data = load_yaml(path)
    data.setdefault("name", Path(path).stem)
    return from_dict(data, where=str(path))
