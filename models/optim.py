"""Stage one's optimizer and learning-rate schedule, each built by name from the experiment config.

In the spirit of timm's create_optimizer_v2: `optim.name` picks a
constructor from OPTIMIZERS and `optim.schedule` a factor function from
SCHEDULES. The trainer (models.trainer.build_optimizer), the LR finder
(through the trainer's function) and benchmarks/train_step.py all build
theirs here, so they cannot drift apart. models.config lists the same names
(config.OPTIMIZERS, config.SCHEDULES: a config loads and is checked without
this module) and tests/test_optim.py holds the two equal.

Parameter groups: two, the backbone's then the head's (`param_groups`),
with the same lr and weight decay. The schedule is one LambdaLR per run,
with one factor function per group: the backbone's is 0 during the frozen
warm-up epochs (train.freeze_epochs), which freezes it without touching
requires_grad (DistributedDataParallel needs the same trainable parameters
all along). The factors are recomputed from the step count, so a resumed
run needs only the step count to continue the same curve.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch.optim.lr_scheduler import LambdaLR

from .config import OptimCfg


# --- optimizers: name -> constructor(params, *, lr, weight_decay, cfg, fused) -----------------------

def _adamw(params, *, lr: float, weight_decay: float, cfg: OptimCfg, fused: bool) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused)


def _adam(params, *, lr: float, weight_decay: float, cfg: OptimCfg, fused: bool) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, fused=fused)


def _sgd(params, *, lr: float, weight_decay: float, cfg: OptimCfg, fused: bool) -> torch.optim.Optimizer:
    # fused not asked of SGD: its foreach default is already one kernel per step on CUDA
    return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay, momentum=cfg.momentum, nesterov=cfg.nesterov)


OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "adamw": _adamw,  # decoupled weight decay (the default)
    "adam": _adam,    # L2 weight decay, added to the gradient
    "sgd": _sgd,      # optim.momentum, optim.nesterov
}


def param_groups(model) -> list[dict]:
    """The SliceNet's parameters in the two groups the schedule expects: backbone, then head."""
    return [{"params": list(model.backbone_parameters())}, {"params": list(model.head_parameters())}]


def create_optimizer(params, cfg: OptimCfg, *, lr: float | None = None, fused: bool = False) -> torch.optim.Optimizer:
    """The optimizer `cfg.name` names, over `params` (tensors or parameter groups), at cfg.lr (or `lr`)
    and cfg.weight_decay. `fused`: one kernel for all parameters (CUDA only; AdamW and Adam)."""
    if cfg.name not in OPTIMIZERS:  # models.config rejects it at load time; this is for hand-made OptimCfgs
        raise ValueError(f"optim.name must be one of {', '.join(OPTIMIZERS)}, got {cfg.name!r}")
    return OPTIMIZERS[cfg.name](params, lr=cfg.lr if lr is None else lr, weight_decay=cfg.weight_decay, cfg=cfg,
                                fused=fused)


# --- schedules: name -> factor(cfg, step, total, steps_per_epoch) of the configured lr -------------

def _cosine(cfg: OptimCfg, step: int, total: int, steps_per_epoch: int) -> float:
    warm = cfg.warmup_epochs * steps_per_epoch
    if step < warm:
        return (step + 1) / warm
    t = (step - warm) / max(total - warm, 1)
    return 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


def _onecycle(cfg: OptimCfg, step: int, total: int, steps_per_epoch: int) -> float:
    """torch OneCycleLR's shape: 30% up from lr/25, cosine down to lr/25e4."""
    t = min(step, total) / max(total, 1)
    start, end, peak = 1 / 25, 1 / 25e4, 0.3
    if t < peak:
        return start + (1 - start) * 0.5 * (1 - math.cos(math.pi * t / peak))
    return end + (1 - end) * 0.5 * (1 + math.cos(math.pi * (t - peak) / (1 - peak)))


def _step(cfg: OptimCfg, step: int, total: int, steps_per_epoch: int) -> float:
    return cfg.step_gamma ** (step // max(cfg.step_epochs * steps_per_epoch, 1))


SCHEDULES: dict[str, Callable[[OptimCfg, int, int, int], float]] = {
    "cosine": _cosine,      # optim.warmup_epochs of linear warm-up, then cosine to 0
    "onecycle": _onecycle,
    "step": _step,          # x optim.step_gamma every optim.step_epochs
}


def lr_factor(cfg: OptimCfg, step: int, total: int, steps_per_epoch: int) -> float:
    """The lr of optimizer step `step` of `total`, as a factor of optim.lr."""
    if cfg.schedule not in SCHEDULES:
        raise ValueError(f"optim.schedule must be one of {', '.join(SCHEDULES)}, got {cfg.schedule!r}")
    return SCHEDULES[cfg.schedule](cfg, step, total, steps_per_epoch)


def build_scheduler(optimizer, cfg: OptimCfg, *, total_steps: int, steps_per_epoch: int,
                    freeze_epochs: int = 0) -> LambdaLR:
    """The run's LambdaLR over the optimizer's two groups (param_groups): backbone, then head."""
    frozen_until = freeze_epochs * steps_per_epoch

    def head(step):
        return lr_factor(cfg, step, total_steps, steps_per_epoch)

    def backbone(step):
        return 0.0 if step < frozen_until else head(step)

    return LambdaLR(optimizer, [backbone, head])
