"""Learning-rate schedules as a factor of the configured lr per optimizer step.

One LambdaLR per run, with one factor function per parameter group: the
backbone's is 0 during the frozen warm-up epochs, which freezes it without
touching requires_grad (DistributedDataParallel needs the same trainable
parameters all along). The factors are recomputed from the step count, so a
resumed run needs only the step count to continue the same curve.
"""
from __future__ import annotations

import math

from torch.optim.lr_scheduler import LambdaLR

from .config import OptimCfg


def lr_factor(cfg: OptimCfg, step: int, total: int, steps_per_epoch: int) -> float:
    t = min(step, total) / max(total, 1)
    if cfg.schedule == "cosine":
        warm = cfg.warmup_epochs * steps_per_epoch
        if step < warm:
            return (step + 1) / warm
        t = (step - warm) / max(total - warm, 1)
        return 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))
    if cfg.schedule == "onecycle":  # torch OneCycleLR's shape: 30% up from lr/25, cosine down to lr/25e4
        start, end, peak = 1 / 25, 1 / 25e4, 0.3
        if t < peak:
            return start + (1 - start) * 0.5 * (1 - math.cos(math.pi * t / peak))
        return end + (1 - end) * 0.5 * (1 + math.cos(math.pi * (t - peak) / (1 - peak)))
    if cfg.schedule == "step":
        return cfg.step_gamma ** (step // max(cfg.step_epochs * steps_per_epoch, 1))
    raise ValueError(cfg.schedule)


def build_scheduler(optimizer, cfg: OptimCfg, *, total_steps: int, steps_per_epoch: int,
                    freeze_epochs: int = 0) -> LambdaLR:
    frozen_until = freeze_epochs * steps_per_epoch

    def head(step):
        return lr_factor(cfg, step, total_steps, steps_per_epoch)

    def backbone(step):
        return 0.0 if step < frozen_until else head(step)

    return LambdaLR(optimizer, [backbone, head])
