"""Augmentation seeding: DataLoader workers draw differently, epochs differ, runs repeat.

The dataset applies the project's train transform (Affine and brightness/contrast
on, so every item is jittered) to one fixed image, so two equal outputs mean two
equal random draws. Each item also reports which worker made it.
"""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

from models.augment import (AugmentWorkerInit, augment_seed, build_train_transform, seed_augment_workers,
                            seed_transform)
from models.config import AugmentCfg

N, BATCH, WORKERS = 24, 4, 2
AUG = AugmentCfg(hflip=0.5, shift_scale_rotate=1.0, contrast=1.0)


class FixedImageSet(Dataset):
    """Like SliceDataset: `transform` attribute, HxWxC uint8 in, CxHxW tensor out."""

    def __init__(self, n: int = N):
        self.n = n
        self.img = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
        self.transform = build_train_transform(AUG)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        out = self.transform(image=self.img)["image"]
        info = get_worker_info()
        return torch.from_numpy(np.ascontiguousarray(out.transpose(2, 0, 1))), -1 if info is None else info.id


def batches(seed, fold, epoch, *, workers=WORKERS, dataset=None, context=None):
    """One epoch's batches, the loader built as trainer.train_fold builds it."""
    dataset = dataset if dataset is not None else FixedImageSet()
    loader = DataLoader(dataset, batch_size=BATCH, num_workers=workers, persistent_workers=False,
                        multiprocessing_context=context if workers else None,
                        worker_init_fn=seed_augment_workers(dataset, seed, fold, epoch))
    return list(loader)


def images(bs) -> torch.Tensor:
    return torch.cat([x for x, _ in bs])


def n_equal(a: torch.Tensor, b: torch.Tensor) -> int:
    return sum(torch.equal(x, y) for x, y in zip(a, b))


def test_workers_draw_differently():
    per_worker: dict[int, list] = {}
    for x, w in batches(0, 0, 0):
        per_worker.setdefault(int(w[0]), []).append(x)
    assert sorted(per_worker) == [0, 1]
    w0, w1 = torch.cat(per_worker[0]), torch.cat(per_worker[1])
    assert len(w0) == len(w1) == N // 2
    assert n_equal(w0, w1) == 0, "worker 0's k-th item equals worker 1's k-th item"


@pytest.mark.parametrize("rebuild", [False, True], ids=["same-dataset", "dataset-per-epoch"])
def test_epochs_differ(rebuild):
    ds = None if rebuild else FixedImageSet()  # train_fold rebuilds it; a reused one must not repeat either
    e0, e1 = images(batches(0, 0, 0, dataset=ds)), images(batches(0, 0, 1, dataset=ds))
    assert n_equal(e0, e1) == 0


def test_same_config_same_batches():
    a, b = batches(3, 1, 2), batches(3, 1, 2)
    assert [w.tolist() for _, w in a] == [w.tolist() for _, w in b]
    assert torch.equal(images(a), images(b))
    assert n_equal(images(a), images(batches(3, 2, 1))) == 0  # fold and epoch swapped: another stream


def test_main_process_loading():
    """num_workers=0: the transform is reseeded per epoch in this process."""
    ds = FixedImageSet()
    e0, again, e1 = (images(batches(0, 0, ep, workers=0, dataset=ds)) for ep in (0, 0, 1))
    assert torch.equal(e0, again)
    assert n_equal(e0, e1) == 0
    assert torch.equal(e0, images(batches(0, 0, 0, workers=1)))  # this process stands in for worker 0


def test_spawn_workers():
    """The worker_init_fn travels by pickle; spawned workers are seeded like forked ones."""
    spawned = batches(0, 0, 0, context="spawn")
    assert torch.equal(images(spawned), images(batches(0, 0, 0, context="fork")))


def test_seeds():
    init = AugmentWorkerInit(0, 1, 2, rank=3)
    assert vars(pickle.loads(pickle.dumps(init))) == vars(init)
    tuples = [(s, f, e, w) for s in range(2) for f in range(3) for e in range(3) for w in range(3)]
    seeds = {augment_seed(*t) for t in tuples}
    assert len(seeds) == len(tuples)
    assert augment_seed(0, 0, 0, 0, rank=1) not in seeds
    assert all(0 <= s < 2**63 for s in seeds)


def test_children_get_their_own_streams():
    """Compose.set_random_seed hands one seed to every child; seed_transform gives each its own."""
    t = build_train_transform(AUG)
    seed_transform(t, 123)
    firsts = [child.py_random.random() for child in t.transforms]
    assert len(set(firsts)) == len(firsts)
    t.set_random_seed(123)  # albumentations alone: every child starts on the same number
    assert len({child.py_random.random() for child in t.transforms}) == 1
