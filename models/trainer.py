"""Training one fold: epochs, validation, the kept checkpoint, resume state.

Per epoch: train on the other folds (sampler, augmentations, AMP, gradient
accumulation), validate on the held-out fold with the competition metric,
append a row to the history, save `fold{k}.last.pt` (everything needed to
resume) and `fold{k}.pt` (weights + config + the train cache's image
settings) for the epoch the config keeps (`train.checkpoint`):
- `last` (default): the final epoch. Nothing about it was chosen by looking
  at the held-out fold, so its out-of-fold predictions are as honest as the
  test predictions, which stage two relies on.
- `best`: the epoch with the best held-out score, among epochs at the final
  input size only (an epoch at an earlier progressive size is never kept:
  out-of-fold and test predictions run at the final size). Its OOF score is
  selected on the fold it scores; models.experiment reports it as such,
  beside the last epoch's.
With `train.average_last: N` > 1, `fold{k}.pt` holds the mean of the last N
epochs' weights instead (a running sum on the CPU, kept in the resume
state; BatchNorm statistics measured again, `recompute_batchnorm`), and the
model train_fold returns, which the OOF predictions use, is that average:
OOF, test and a study all load or use the same averaged model.
Every file is written atomically (temporary file + rename): a kill mid-save
leaves the previous good file. Their format, writer and reader: models.checkpoint.

The loss, the optimizer (models.optim: optim.name, optim.schedule) and the
fp16 loss scaler come from build_criterion, build_optimizer and
build_scaler, which the LR finder (models.lr_finder) calls too.

One training DataLoader serves all epochs of a fold, its workers persistent
(`train_loader`): the epoch and its progressive size travel with the indices
and each worker reseeds its augmentations per epoch, so the batches are those
a new loader per epoch gave, without restarting the workers every epoch.

Speed of the real run: every epoch logs (and writes into the history) its
steady-state training rate (`img_per_s`: images per second after the first
steps, over all processes) and `compile_s`, the seconds of the steps that
built a compiled graph (the first training step and the first validation
batch at a new size; with `train.compile` each size compiles once, see
models.net.SliceNet.compile_backbone).
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from ich import provenance
from ich.cache import image_settings, read_meta
from ich.labels import LABELS
from ich.metric import per_label_log_loss, prior_baseline, weighted_log_loss
from ich.stage_one import fold_checkpoint, resume_state

from . import checkpoint
from .augment import EpochSeeder, build_train_transform
from .config import ExperimentCfg
from .data import EpochSampler, SliceDataset, input_channels
from .inference import make_loader, one_pass, predict
from .net import SliceNet
from .runtime import Runtime
from .optim import build_scheduler, create_optimizer, param_groups


@dataclass
class FoldData:
    train: pd.DataFrame
    valid: pd.DataFrame
    clean_dir: Path
    images: object = None  # None: the image cache in clean_dir; else ich.dicom_rows.DicomRows (input.source: dicom)


def cache_channels(cfg: ExperimentCfg, clean_dir) -> int:
    """Input channels of the network for this experiment on the cache in clean_dir."""
    windows = (read_meta(clean_dir) or {}).get("windows") or [None] * 3
    return input_channels(cfg.input.mode, len(windows))


def build_model(cfg: ExperimentCfg, runtime: Runtime, in_chans: int = 3) -> SliceNet:
    model = SliceNet(cfg.model.backbone, cfg.model.pretrained, cfg.model.dropout, in_chans).to(runtime.device)
    if runtime.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def make_dataset(cfg: ExperimentCfg, table, clean_dir, size: int, train: bool, images=None) -> SliceDataset:
    """images: None for the cache in clean_dir, or rows read from the DICOMs (ich.dicom_rows.DicomRows)."""
    return SliceDataset(table, clean_dir, mode=cfg.input.mode, channel=cfg.input.adjacent_channel,
                        size=size, transform=build_train_transform(cfg.augment) if train else None, images=images)


class WeightedBCE(nn.Module):
    """BCE per label, weighted like the metric (2 on `any`), optional positive weights."""

    def __init__(self, any_weight: float = 2.0, pos_weight=None):
        super().__init__()
        w = torch.ones(len(LABELS))
        w[-1] = any_weight
        self.register_buffer("weights", w / w.sum())
        self.register_buffer("pos_weight", None if pos_weight is None else torch.as_tensor(pos_weight).float())

    def forward(self, logits, target):
        loss = nn.functional.binary_cross_entropy_with_logits(
            logits.float(), target, pos_weight=self.pos_weight, reduction="none")
        return (loss * self.weights).sum(dim=1).mean()


def build_criterion(cfg: ExperimentCfg, y_train: np.ndarray, runtime: Runtime) -> WeightedBCE:
    """The training loss for labels y_train (n x 6): the metric's weights (loss.any_weight on `any`) and,
    with loss.pos_weight, each label's negative/positive ratio in y_train. The LR finder uses it too."""
    pos_weight = None
    if cfg.loss.pos_weight:
        pos = y_train.sum(0).clip(min=1)
        pos_weight = (len(y_train) - pos) / pos
    return WeightedBCE(cfg.loss.any_weight, pos_weight).to(runtime.device)


def build_optimizer(cfg: ExperimentCfg, model: SliceNet, runtime: Runtime, *, lr: float | None = None):
    """The config's optimizer (models.optim, optim.name) over the model's backbone and head groups, at
    optim.lr (or `lr`); fused on CUDA: one kernel for all parameters instead of a loop over them."""
    return create_optimizer(param_groups(model), cfg.optim, lr=lr, fused=runtime.device.type == "cuda")


def build_scaler(runtime: Runtime) -> torch.amp.GradScaler:
    """Loss scaling for fp16 autocast (bf16 and full precision need none: a disabled scaler passes through)."""
    return torch.amp.GradScaler(enabled=runtime.amp_dtype == torch.float16)


def train_loader(dataset, sampler: EpochSampler, cfg: ExperimentCfg, runtime: Runtime, *,
                 drop_last: bool = False) -> DataLoader:
    """One training DataLoader for a whole fold, its workers started once (persistent).

    Everything an epoch changes reaches the workers with the indices: the
    sampler must be tagged (EpochSampler(tagged=True), its set_epoch(epoch,
    size) called before each epoch), and the dataset's on_epoch hook
    (EpochSeeder) reseeds each worker's augmentations for the new epoch, as
    per-epoch loaders with a worker_init_fn did (the same batches; see
    models.data and models.augment). A resumed fold builds a new one.
    `drop_last`: for a compiled model, whose static graphs would compile
    again for the short last batch of every size (a few images of a shuffled
    epoch left out instead).
    """
    if not sampler.tagged:
        raise ValueError("persistent workers need a tagged EpochSampler: they would not see the epoch otherwise")
    workers = cfg.train.num_workers
    return DataLoader(dataset, batch_size=cfg.train.batch_size, sampler=sampler, num_workers=workers,
                      pin_memory=runtime.device.type == "cuda", drop_last=drop_last,
                      prefetch_factor=4 if workers else None, persistent_workers=workers > 0)


def graphs_built() -> int:
    """Graphs torch.compile has built in this process so far (dynamo's own counter)."""
    from torch._dynamo.utils import counters
    return counters["stats"]["unique_graphs"]


def validate(model, dataset, runtime: Runtime, cfg: ExperimentCfg, progress: bool, timing: dict | None = None):
    """Held-out probabilities; `timing["first_batch_s"]`: seconds to the first batch done (compile included)."""
    loader = make_loader(dataset, runtime, cfg.train.batch_size * 2, cfg.train.num_workers)
    t0 = runtime.now()

    def first(i):
        if i == 0 and timing is not None:
            timing["first_batch_s"] = runtime.now() - t0

    probs, _ = predict(model, loader, runtime, tta_hflip=False, embeddings=False, desc="validate",
                       progress=progress, on_batch=first)
    return probs


BN_BATCHES = 100  # batches of training images that recompute BatchNorm statistics after averaging


def is_averaged(key: str, value: torch.Tensor) -> bool:
    """State-dict entries that average_last averages: the floating-point ones (weights, BatchNorm statistics
    until they are recomputed); integer counters (num_batches_tracked) keep the last epoch's value."""
    return value.is_floating_point()


def recompute_batchnorm(model: SliceNet, table: pd.DataFrame, cfg: ExperimentCfg, clean_dir, runtime: Runtime,
                        size: int, batches: int = BN_BATCHES, images=None) -> int:
    """Reset every BatchNorm's running statistics and measure them again on training images; -> images used.

    The mean of several epochs' weights is a network none of those epochs
    was: its layers' activations do not have the statistics any epoch's
    running averages describe (averaging the running averages is no
    substitute: the SWA paper's finding, and torch.optim.swa_utils.update_bn's
    reason to be). So, as update_bn does, each running mean and variance is
    the plain average over one pass of `batches` training batches (the whole
    training part when it is smaller, in table order; else a fixed random
    subset): cumulative averaging (momentum None), train mode, no gradients.
    The images are not augmented: they are the images OOF and test
    predictions see. It runs the eager backbone (a compiled one would build
    a third graph per size for this one pass), on every process alike, so
    all ranks hold one model.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return 0
    n = min(len(table), batches * cfg.train.batch_size)
    subset = table if n == len(table) else table.sample(n, random_state=cfg.train.seed)
    loader = DataLoader(make_dataset(cfg, subset, clean_dir, size, train=False, images=images),
                        batch_size=cfg.train.batch_size,
                        shuffle=False, num_workers=cfg.train.num_workers)
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    was_training = model.training
    model.train()
    with torch.no_grad():
        for x, _, _ in loader:
            x = x.to(runtime.device, non_blocking=True)
            if runtime.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with runtime.autocast():
                model.backbone((x.float() - model.mean) / model.std)
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    model.train(was_training)
    return n


def trainable(cfg: ExperimentCfg, table: pd.DataFrame) -> np.ndarray | None:
    """The training slices the sampler may draw: brain_fraction >= sampler.min_brain_fraction (None: all)."""
    threshold = cfg.sampler.min_brain_fraction
    if threshold <= 0:
        return None
    if "brain_fraction" not in table:
        raise ValueError("sampler.min_brain_fraction needs the brain_fraction column of slices.parquet, which "
                         "this cache lacks: rerun prepare_data.py --force, or set it to 0")
    keep = table["brain_fraction"].to_numpy() >= threshold
    if not keep.any():
        raise ValueError(f"no training slice has brain_fraction >= {threshold} (sampler.min_brain_fraction)")
    return keep


def train_fold(cfg: ExperimentCfg, fold: int, data: FoldData, out_dir: Path, runtime: Runtime, *,
               resume: bool, progress: bool = True, log=print) -> tuple[SliceNet, pd.DataFrame]:
    """Train one fold; returns the model as it is after the last epoch, and the epoch history.

    The kept checkpoint (`fold{k}.pt`, see the module docstring) may be an
    earlier epoch; models.experiment loads it for the fold's outputs.
    """
    torch.manual_seed(cfg.train.seed + fold)
    model = build_model(cfg, runtime, cache_channels(cfg, data.clean_dir))
    raw_model = model
    compiled = runtime.wants_compile(cfg.train.compile)
    if compiled:
        raw_model.compile_backbone()  # state_dict() stays the plain module's
    if runtime.distributed:
        model = DistributedDataParallel(model, device_ids=[runtime.device] if runtime.device.type == "cuda" else None)

    y_train = data.train[list(LABELS)].to_numpy(np.float32)
    criterion = build_criterion(cfg, y_train, runtime)

    sampler = EpochSampler(y_train[:, -1], kind=cfg.sampler.kind, neg_ratio=cfg.sampler.neg_ratio,
                           seed=cfg.train.seed + 1000 * fold, rank=runtime.rank, world_size=runtime.world_size,
                           tagged=True, eligible=trainable(cfg, data.train))
    if sampler.n_all < len(data.train) and runtime.is_main:
        log(f"fold {fold}: training on {sampler.n_all} of {len(data.train)} slices (brain_fraction >= "
            f"{cfg.sampler.min_brain_fraction}); validation and OOF cover all")
    raw_model.set_sampling(sampler.neg_keep)  # its probabilities() then undo the sampler's prior shift
    drop_last = compiled and len(sampler) >= cfg.train.batch_size  # static graphs: full batches only
    batches = len(sampler) // cfg.train.batch_size if drop_last else math.ceil(len(sampler) / cfg.train.batch_size)
    steps_per_epoch = math.ceil(batches / cfg.train.accumulate)
    optimizer = build_optimizer(cfg, raw_model, runtime)
    scheduler = build_scheduler(optimizer, cfg.optim, total_steps=steps_per_epoch * cfg.train.epochs,
                                steps_per_epoch=steps_per_epoch, freeze_epochs=cfg.train.freeze_epochs)
    scaler = build_scaler(runtime)

    best_path, last_path = fold_checkpoint(out_dir, fold), resume_state(out_dir, fold)
    start_epoch, best, history = 0, math.inf, []
    averaging = cfg.train.average_last > 1
    first_averaged = cfg.train.epochs - cfg.train.average_last  # 0-based epoch where averaging starts
    avg_sum = None  # the running sum of the averaged epochs' weights (on the CPU), kept in the resume state
    if resume and last_path.is_file():
        state = checkpoint.read_resume(last_path, runtime.device)
        raw_model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        start_epoch, best, history = state["epoch"] + 1, state["best"], list(state["history"])
        avg_sum = state.get("avg_sum")  # kept on the CPU, where the epochs' weights are added to it
        avg_sum = None if avg_sum is None else {k: v.cpu() for k, v in avg_sum.items()}
        log(f"fold {fold}: resuming after epoch {start_epoch} of {cfg.train.epochs} (best {best:.4f})")

    y_valid = data.valid[list(LABELS)].to_numpy(np.float32)
    prior = weighted_log_loss(y_valid, prior_baseline(y_train, len(y_valid)))
    valid_set = make_dataset(cfg, data.valid, data.clean_dir, cfg.final_size, train=False, images=data.images)
    trained_on = image_settings(read_meta(data.clean_dir))  # stored with the kept weights
    made_by = provenance.record(cfg.to_dict(), runtime.describe(), data.clean_dir) if runtime.is_main else None
    train_set = make_dataset(cfg, data.train, data.clean_dir, cfg.size_at(start_epoch), train=True,
                             images=data.images)
    train_set.on_epoch = EpochSeeder(cfg.train.seed, fold, runtime.rank)
    loader = train_loader(train_set, sampler, cfg, runtime, drop_last=drop_last)

    for epoch in range(start_epoch, cfg.train.epochs):
        t0 = time.time()
        size = cfg.size_at(epoch)
        sampler.set_epoch(epoch, size)  # the workers learn both from the indices
        compiling = raw_model.__dict__.get("_compiled") is not None and epoch == start_epoch
        graphs, timing = graphs_built(), {}
        train_loss = run_epoch(model, loader, criterion, optimizer, scheduler, scaler, runtime, cfg,
                               desc=f"fold {fold} epoch {epoch + 1}/{cfg.train.epochs}", progress=progress,
                               timing=timing)
        compile_s = timing.get("first_step_s", 0.0) if graphs_built() > graphs else 0.0
        if compiling and runtime.is_main:
            log(raw_model.compile_note or f"fold {fold}: backbone compiled with torch.compile, one static graph "
                                          "per input size (the first step at each size includes compiling)")
        valid_set.size = cfg.size_at(epoch)
        graphs, valid_timing = graphs_built(), {}
        probs = validate(raw_model, valid_set, runtime, cfg, progress, timing=valid_timing)
        if graphs_built() > graphs:
            compile_s += valid_timing.get("first_batch_s", 0.0)
        score = weighted_log_loss(y_valid, probs)
        per_label = per_label_log_loss(y_valid, probs)
        at_final_size = size == cfg.final_size
        improved = at_final_size and score < best  # only epochs at the size OOF/test run at compete
        if improved:
            best = score
        keep = improved if cfg.train.checkpoint == "best" else epoch == cfg.train.epochs - 1
        averaged = ""
        if averaging and epoch >= first_averaged:
            weights = {k: v.detach().to("cpu", torch.float32, copy=True)  # a copy: on the CPU .float() aliases
                       for k, v in raw_model.state_dict().items() if is_averaged(k, v)}
            avg_sum = weights if avg_sum is None else {k: avg_sum[k] + weights[k] for k in avg_sum}
            if epoch == cfg.train.epochs - 1:
                last_score = score
                state = raw_model.state_dict()
                raw_model.load_state_dict({k: (avg_sum[k] / cfg.train.average_last).to(v.dtype)
                                           if k in avg_sum else v for k, v in state.items()})
                n_bn = recompute_batchnorm(raw_model, data.train, cfg, data.clean_dir, runtime, size,
                                           images=data.images)
                probs = validate(raw_model, valid_set, runtime, cfg, progress)
                score = weighted_log_loss(y_valid, probs)
                per_label = per_label_log_loss(y_valid, probs)
                averaged = (f" | weights of epochs {first_averaged + 1}-{cfg.train.epochs} averaged, BatchNorm "
                            f"recomputed on {n_bn} images: val {score:.4f} (last epoch alone {last_score:.4f})")
        row = {"fold": fold, "epoch": epoch + 1, "size": size, "kept": keep, "train_loss": train_loss,
               "val_wlogloss": score, "val_prior": prior, "lr": optimizer.param_groups[1]["lr"],
               "seconds": time.time() - t0, "img_per_s": timing.get("img_per_s", math.nan),
               "compile_s": compile_s, **{f"val_{k}": float(v) for k, v in zip(LABELS, per_label)}}
        history.append(row)
        if runtime.is_main:
            if keep:
                checkpoint.save_fold(best_path, raw_model, cfg, fold=fold, epoch=epoch + 1, score=score,
                                     image_settings=trained_on, provenance=made_by)
            checkpoint.save({"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                         "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "epoch": epoch,
                         "best": best, "history": history, "avg_sum": avg_sum}, last_path)
            labels = " ".join(f"{k[:4]} {v:.3f}" for k, v in zip(LABELS, per_label))
            log(f"fold {fold} epoch {epoch + 1}/{cfg.train.epochs} size {size} | train {train_loss:.4f} | "
                f"val {score:.4f} (prior {prior:.4f}) | {labels} | {row['seconds']:.0f} s | "
                f"{row['img_per_s']:,.0f} img/s" + (f" | compile {compile_s:.0f} s" if compile_s else "")
                + (" | best" if improved else "") + (" | kept" if keep else "") + averaged)
        runtime.barrier()
    return raw_model, pd.DataFrame(history)


def run_epoch(model, loader, criterion, optimizer, scheduler, scaler, runtime: Runtime, cfg: ExperimentCfg,
              *, desc: str, progress: bool, on_batch=None, timing: dict | None = None) -> float:
    """One pass over the loader; the mean training loss. on_batch(i), if given, runs after batch i
    (benchmarks/train_step.py times the steady state with it).

    `timing`, if given, gets `first_step_s` (the first batch's arrival to its step done: compiling
    when the epoch starts a new size), `loader_start_s` (the wait for the first batch) and
    `img_per_s`: the steady-state rate over the batches after the first `warm` ones (NaN when
    the epoch has no more), times the number of processes. The device is synchronised at those
    three points only, so timing costs nothing measurable.
    """
    model.train()
    n_batches = len(loader)
    warm = max(1, min(20, n_batches // 10))  # compile, cuDNN autotuning and the pipeline filling up
    t_start = runtime.now()
    marks = {}
    total, count = 0.0, 0
    accumulate = cfg.train.accumulate
    optimizer.zero_grad(set_to_none=True)
    bar = one_pass(loader, desc=desc, show=progress and runtime.is_main)
    for i, (x, y, _) in enumerate(bar):
        if i == 0:
            marks["arrived"] = time.perf_counter()
        x = x.to(runtime.device, non_blocking=True)
        y = y.to(runtime.device, non_blocking=True)
        if runtime.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        last_of_step = (i + 1) % accumulate == 0 or i + 1 == n_batches
        sync = model.no_sync() if runtime.distributed and not last_of_step else contextlib.nullcontext()
        with sync:
            with runtime.autocast():
                loss = criterion(model(x), y)
            scaler.scale(loss / accumulate).backward()
        if last_of_step:
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
        total += loss.item() * len(x)
        count += len(x)
        if i % 10 == 0:
            bar.set_postfix(loss=f"{total / count:.4f}")
        if i == 0 or i + 1 == warm:
            marks[i + 1] = (runtime.now(), count)
        if on_batch is not None:
            on_batch(i)
    if timing is not None and marks:
        t_end = runtime.now()
        timing["loader_start_s"] = marks["arrived"] - t_start
        timing["first_step_s"] = marks[1][0] - marks["arrived"]
        t_warm, n_warm = marks[warm]
        steady = count - n_warm
        timing["img_per_s"] = steady / (t_end - t_warm) * runtime.world_size if steady else math.nan
    sums = runtime.gather((total, count))
    return sum(t for t, _ in sums) / max(sum(c for _, c in sums), 1)
