"""Training augmentations, built from the config with albumentations.

All on uint8 HxWxC images before they become tensors. Geometry is applied
identically to every channel, which is what both input modes need (windows
of one slice, or neighbor slices).

Seeding. albumentations does not draw from the global `random`/numpy
generators: every Compose and every transform in it owns a `random.Random`
(`py_random`) and a numpy Generator (`random_generator`), set by
`set_random_seed` (from OS entropy when the seed is None). DataLoader workers
are copies of the main process's dataset (forked, or unpickled with 'spawn',
which keeps the generator state too), so without reseeding every worker
draws the same sequence, and a transform that is not rebuilt repeats it
every epoch. Each (seed, fold, epoch, worker) gets its own stream:
training sees all the variety, and a rerun sees the same batches.

Two ways to get there, with the same streams:
- `EpochSeeder` (the trainer): persistent workers, started once per fold;
  the dataset calls it when the first item of a new epoch reaches it
  (models.data.EpochAware; the tagged EpochSampler sends the epoch with
  every index). A worker_init_fn could not do it: it runs once per worker.
- `seed_augment_workers` (a new DataLoader per epoch, persistent_workers
  False: the LR finder): the epoch is fixed when the loader is built, and
  the worker_init_fn seeds each worker as it starts.
A DataLoader hands batch k of every epoch to worker k mod num_workers, so both
give the same batches (tests/test_augment.py holds them equal).
"""
from __future__ import annotations

import random

import albumentations as A
import cv2
import numpy as np
import torch
from torch.utils.data import get_worker_info

from .config import AugmentCfg


class ByLabel:
    """Two pipelines, picked per image by its `any` label: a positive slice gets every step but the
    erasing, a negative slice all of them (augment.erasing_on: negatives). CoarseDropout's holes can
    cover a small lesion whose label stays positive, teaching the network that a slice with no visible
    blood bleeds; on a negative slice no hole can change the label. Called as models.data.SliceDataset
    calls a transform, plus `positive`."""

    by_label = True

    def __init__(self, negative: A.Compose, positive: A.Compose | None):
        self.negative, self.positive = negative, positive

    def __call__(self, *, image: np.ndarray, positive: bool = False) -> dict:
        if positive:
            return self.positive(image=image) if self.positive is not None else {"image": image}
        return self.negative(image=image)

    def set_random_seed(self, seed: int) -> None:
        seed_transform(self.negative, _derive(seed, 1))
        seed_transform(self.positive, _derive(seed, 2))


def build_train_transform(cfg: AugmentCfg) -> A.Compose | ByLabel | None:
    steps = []
    if cfg.hflip > 0:
        steps.append(A.HorizontalFlip(p=cfg.hflip))
    if cfg.transpose > 0:
        steps.append(A.Transpose(p=cfg.transpose))
    if cfg.shift_scale_rotate > 0:
        steps.append(A.Affine(
            translate_percent=(-cfg.shift_limit, cfg.shift_limit),
            scale=(1 - cfg.scale_limit, 1 + cfg.scale_limit),
            rotate=(-cfg.rotate_limit, cfg.rotate_limit),
            border_mode=cv2.BORDER_CONSTANT, fill=0, p=cfg.shift_scale_rotate))
    if cfg.blur > 0:
        steps.append(A.GaussianBlur(blur_limit=(3, max(3, cfg.blur_limit | 1)), p=cfg.blur))
    if cfg.contrast > 0:
        steps.append(A.RandomBrightnessContrast(brightness_limit=cfg.contrast_limit,
                                                contrast_limit=cfg.contrast_limit, p=cfg.contrast))
    if cfg.erasing > 0:
        erase = A.CoarseDropout(num_holes_range=(1, max(1, cfg.erasing_holes)),
                                hole_height_range=(0.02, cfg.erasing_size),
                                hole_width_range=(0.02, cfg.erasing_size), fill=0, p=cfg.erasing)
        if cfg.erasing_on == "negatives":
            return ByLabel(A.Compose([*steps, erase]), A.Compose(steps) if steps else None)
        steps.append(erase)
    return A.Compose(steps) if steps else None


def augment_seed(seed: int, fold: int, epoch: int, worker: int = 0, rank: int = 0) -> int:
    """A 63-bit seed for one (config seed, fold, epoch, worker, DDP rank); all must be >= 0.

    Through numpy's SeedSequence, so nearby tuples (fold 1 epoch 0 vs fold 0
    epoch 1, ...) give unrelated seeds, unlike sums such as seed + fold + epoch.
    """
    return _derive(seed, fold, epoch, worker, rank)


def _derive(*entropy: int) -> int:
    return int(np.random.SeedSequence(list(entropy)).generate_state(1, np.uint64)[0]) >> 1


def seed_transform(transform, seed: int) -> None:
    """Reseed an albumentations transform (a Compose and everything in it) from one seed.

    `Compose.set_random_seed(seed)` reseeds the Compose's own `py_random` and
    `random_generator` and hands the *same* seed to every child, so all the
    children draw the same numbers (e.g. HorizontalFlip and Affine with equal
    p would always decide together on the first image). So each child is then
    reseeded, through its own `set_random_seed`, from a seed of its own derived
    from (seed, position).
    """
    if transform is None or not hasattr(transform, "set_random_seed"):
        return
    transform.set_random_seed(seed)
    for i, child in enumerate(getattr(transform, "transforms", None) or []):
        seed_transform(child, _derive(seed, i + 1))


def seed_globals(seed: int) -> None:
    """Seed python's `random`, numpy's global generator and torch from one seed (for a worker)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def seed_worker_stream(transform, seed: int, fold: int, epoch: int, worker: int, rank: int,
                       in_worker: bool) -> None:
    """Start the augmentation stream of (seed, fold, epoch, worker, rank) in this process.

    In a worker, also its global random/numpy/torch generators, in case
    anything else in loading draws from them; never in the main process,
    whose torch generator training (dropout, ...) uses.
    """
    s = augment_seed(seed, fold, epoch, worker, rank)
    if in_worker:
        seed_globals(_derive(s, 0))  # children of the transform get _derive(s, 1), (s, 2), ...
    seed_transform(transform, s)


class EpochSeeder:
    """`on_epoch` hook of a models.data.EpochAware dataset: reseed its transform for each new epoch.

    For persistent DataLoader workers, which start once per fold and keep
    their copy of the dataset: the tagged sampler sends the epoch with every
    index, and at the first item of a new epoch each worker (or the main
    process, num_workers=0, as worker 0) starts the stream of (seed, fold,
    epoch, its worker id, rank). A plain picklable object, for 'fork' and
    'spawn' alike.
    """

    def __init__(self, seed: int, fold: int, rank: int = 0):
        self.seed, self.fold, self.rank = int(seed), int(fold), int(rank)

    def __call__(self, dataset, epoch: int) -> None:
        info = get_worker_info()
        seed_worker_stream(getattr(dataset, "transform", None), self.seed, self.fold, int(epoch),
                           0 if info is None else info.id, self.rank, in_worker=info is not None)

    def __repr__(self) -> str:
        return f"EpochSeeder(seed={self.seed}, fold={self.fold}, rank={self.rank})"


class AugmentWorkerInit:
    """`worker_init_fn` that reseeds each worker's augmentations from (seed, fold, epoch, worker id).

    A plain picklable object (module-level class, int fields), so it works with
    the 'fork' and 'spawn' start methods. It reseeds the worker's copy of
    `dataset.transform` (see `seed_transform`) and the worker's global
    random/numpy/torch generators, in case anything else in loading draws from them.

    The epoch is fixed when the object is built: it fits a new DataLoader per
    epoch with persistent_workers=False, so workers start (and this runs) again
    every epoch. Persistent workers start once: with this alone a worker would
    just go on drawing, so epoch e's draws would depend on what came before (a
    resumed run would not see the uninterrupted run's batches). They use
    EpochSeeder instead.
    """

    def __init__(self, seed: int, fold: int, epoch: int, rank: int = 0):
        self.seed, self.fold, self.epoch, self.rank = int(seed), int(fold), int(epoch), int(rank)

    def __call__(self, worker_id: int) -> None:
        info = get_worker_info()
        transform = getattr(info.dataset, "transform", None) if info is not None else None
        seed_worker_stream(transform, self.seed, self.fold, self.epoch, worker_id, self.rank, in_worker=True)

    def __repr__(self) -> str:
        return f"AugmentWorkerInit(seed={self.seed}, fold={self.fold}, epoch={self.epoch}, rank={self.rank})"


def seed_augment_workers(dataset, seed: int, fold: int, epoch: int, rank: int = 0) -> AugmentWorkerInit:
    """Seed `dataset.transform` for (seed, fold, epoch) and return the DataLoader's worker_init_fn.

    For a DataLoader built per epoch (persistent workers use EpochSeeder).
    Call it once per epoch when building that epoch's DataLoader:
    `DataLoader(ds, ..., worker_init_fn=seed_augment_workers(ds, seed, fold, epoch, rank))`.
    `rank` (DistributedDataParallel) keeps the ranks' workers apart too.
    The transform in this process gets worker 0's seed, so num_workers=0 (the
    main process loads) also differs per epoch and repeats across runs, and gives
    the same batches as num_workers=1. With workers, each worker reseeds its own
    copy. The main process's global generators are left alone: the transforms do
    not use them, and training (dropout, ...) does.
    """
    seed_transform(getattr(dataset, "transform", None), augment_seed(seed, fold, epoch, 0, rank))
    return AugmentWorkerInit(seed, fold, epoch, rank)
