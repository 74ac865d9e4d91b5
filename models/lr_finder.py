"""Learning-rate range test (Smith 2015): raise the lr exponentially over a few
hundred batches, record the smoothed loss, stop when it diverges.

The suggestion is the lr of the steepest loss descent, a common and robust
pick; the plot shows the whole curve so a person can choose otherwise.

What is trained is what train.py trains: the model, loss (loss.pos_weight
included), optimizer (optim.name, both parameter groups, fused on CUDA) and
fp16 loss scaler come from the trainer's own functions (models.trainer
build_model, build_criterion, build_optimizer, build_scaler), so the
suggested lr is one for the optimizer the run will use.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ich.labels import LABELS

from . import plots
from .augment import seed_augment_workers
from .config import ExperimentCfg
from .data import EpochSampler
from .runtime import Runtime
from .trainer import build_criterion, build_model, build_optimizer, build_scaler, cache_channels, make_dataset


def find_lr(cfg: ExperimentCfg, slices, clean_dir: Path, runtime: Runtime, out_png: Path, *,
            start_lr: float = 1e-6, end_lr: float = 1.0, steps: int = 200, progress: bool = True,
            images=None) -> dict:
    """images: None for the image cache in clean_dir, or DicomRows (input.source: dicom; models.experiment)."""
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg, runtime, cache_channels(cfg, clean_dir))
    criterion = build_criterion(cfg, slices[list(LABELS)].to_numpy(np.float32), runtime)
    optimizer = build_optimizer(cfg, model, runtime, lr=start_lr)
    scaler = build_scaler(runtime)
    dataset = make_dataset(cfg, slices, clean_dir, cfg.size_at(0), train=True, images=images)
    sampler = EpochSampler(slices[LABELS[-1]].to_numpy(), kind=cfg.sampler.kind, neg_ratio=cfg.sampler.neg_ratio,
                           seed=cfg.train.seed)
    loader = DataLoader(dataset, batch_size=cfg.train.batch_size, sampler=sampler,
                        num_workers=cfg.train.num_workers, drop_last=True,
                        worker_init_fn=seed_augment_workers(dataset, cfg.train.seed, 0, 0))
    gamma = (end_lr / start_lr) ** (1 / max(steps - 1, 1))
    lrs, losses, avg, best = [], [], 0.0, math.inf
    model.train()
    bar = tqdm(total=steps, desc="lr finder", disable=not progress, unit="batch")
    step, epoch = 0, 0
    while step < steps:
        sampler.set_epoch(epoch)
        for x, y, _ in loader:
            lr = start_lr * gamma ** step
            for g in optimizer.param_groups:
                g["lr"] = lr
            x, y = x.to(runtime.device), y.to(runtime.device)
            if runtime.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with runtime.autocast():
                loss = criterion(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            avg = 0.9 * avg + 0.1 * loss.item()
            smooth = avg / (1 - 0.9 ** (step + 1))
            lrs.append(lr)
            losses.append(smooth)
            best = min(best, smooth)
            step += 1
            bar.update(1)
            if step >= steps or not math.isfinite(smooth) or smooth > 4 * best:
                step = steps
                break
        epoch += 1
    bar.close()
    lrs_a, losses_a = np.array(lrs), np.array(losses)
    skip = max(1, len(lrs_a) // 10)  # the first points are noise from the running-mean start
    grad = np.gradient(losses_a[skip:], np.log(lrs_a[skip:])) if len(lrs_a) > skip + 2 else np.array([0.0])
    suggestion = float(lrs_a[skip + int(np.argmin(grad))]) if len(lrs_a) > skip + 2 else float(lrs_a[0])
    plots.lr_finder(lrs_a, losses_a, suggestion, out_png, title=f"lr finder: {cfg.name}")
    return {"suggested_lr": suggestion, "plot": out_png, "lrs": lrs_a, "losses": losses_a}
