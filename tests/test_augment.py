"""Augmentation seeding: DataLoader workers draw differently, epochs differ, runs repeat.

The dataset applies the project's train transform (Affine and brightness/contrast
on, so every item is jittered) to one fixed image, so two equal outputs mean two
equal random draws. Each item also reports which worker (id and process) made it.

Two loaders are checked: one DataLoader per epoch, seeded by a worker_init_fn
(`seed_augment_workers`), and the trainer's one persistent-worker DataLoader
per fold, whose workers learn the epoch from a tagged sampler and reseed
themselves (`EpochSeeder`). They must give the same batches.
"""
from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

from models.augment import (AugmentWorkerInit, EpochSeeder, augment_seed, build_train_transform,
                            seed_augment_workers, seed_transform)
from models.config import AugmentCfg
from models.data import EpochAware, EpochSampler

N, BATCH, WORKERS = 24, 4, 2
AUG = AugmentCfg(hflip=0.5, shift_scale_rotate=1.0, contrast=1.0)


class FixedImageSet(EpochAware, Dataset):
    """Like SliceDataset: `transform` attribute, EpochItem or plain keys, HxWxC uint8 in, CxHxW tensor out."""

    def __init__(self, n: int = N):
        self.n = n
        self.img = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
        self.transform = build_train_transform(AUG)

    def __len__(self):
        return self.n

    def __getitem__(self, key):
        self.start_item(key)
        out = self.transform(image=self.img)["image"]
        info = get_worker_info()
        return (torch.from_numpy(np.ascontiguousarray(out.transpose(2, 0, 1))), -1 if info is None else info.id,
                os.getpid())


def batches(seed, fold, epoch, *, workers=WORKERS, dataset=None, context=None):
    """One epoch's batches, the loader built as trainer.train_fold builds it."""
    dataset = dataset if dataset is not None else FixedImageSet()
    loader = DataLoader(dataset, batch_size=BATCH, num_workers=workers, persistent_workers=False,
                        multiprocessing_context=context if workers else None,
                        worker_init_fn=seed_augment_workers(dataset, seed, fold, epoch))
    return list(loader)


def persistent_epochs(seed, fold, epochs, *, workers=WORKERS, context=None):
    """Each epoch's batches from ONE DataLoader with persistent workers, built as trainer.train_loader builds it."""
    dataset = FixedImageSet()
    dataset.on_epoch = EpochSeeder(seed, fold)
    sampler = EpochSampler(np.zeros(N), shuffle=False, tagged=True)
    loader = DataLoader(dataset, batch_size=BATCH, sampler=sampler, num_workers=workers,
                        persistent_workers=workers > 0, multiprocessing_context=context if workers else None)
    out = []
    for epoch in epochs:
        sampler.set_epoch(epoch)
        out.append(list(loader))
    return out


def images(bs) -> torch.Tensor:
    return torch.cat([b[0] for b in bs])


def pids(bs) -> set[int]:
    return {int(p) for b in bs for p in b[2]}


def n_equal(a: torch.Tensor, b: torch.Tensor) -> int:
    return sum(torch.equal(x, y) for x, y in zip(a, b))


def test_workers_draw_differently():
    per_worker: dict[int, list] = {}
    for x, w, _ in batches(0, 0, 0):
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
    assert [b[1].tolist() for b in a] == [b[1].tolist() for b in b]
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


# --- persistent workers: one DataLoader for the epochs of a fold ------------------------------

def test_persistent_workers_see_each_epoch():
    """Epochs 0, 1, 2 from one loader: the same worker processes, a new stream each epoch, the
    per-epoch loaders' batches exactly, and the same batches again in a second run."""
    run = persistent_epochs(0, 0, [0, 1, 2])
    assert pids(run[0]) == pids(run[1]) == pids(run[2]) and len(pids(run[0])) == WORKERS  # workers persisted
    assert os.getpid() not in pids(run[0])
    for epoch, got in enumerate(run):
        assert [b[1].tolist() for b in got] == [b[1].tolist() for b in batches(0, 0, epoch)]
        assert torch.equal(images(got), images(batches(0, 0, epoch)))
        by_worker = [images([b for b in got if int(b[1][0]) == w]) for w in range(WORKERS)]
        assert n_equal(*by_worker) == 0  # workers draw differently within the epoch
    for a in range(3):
        for b in range(a + 1, 3):
            assert n_equal(images(run[a]), images(run[b])) == 0, f"epoch {b} repeats draws of epoch {a}"
    again = persistent_epochs(0, 0, [0, 1, 2])
    assert all(torch.equal(images(x), images(y)) for x, y in zip(run, again))
    other_fold = persistent_epochs(0, 1, [0])
    assert n_equal(images(run[0]), images(other_fold[0])) == 0


class SizeProbe(EpochAware, Dataset):
    """Reports the size attribute as the process making the item sees it."""
    size = 32

    def __len__(self):
        return N

    def __getitem__(self, key):
        self.start_item(key)
        return self.size


def test_why_the_epoch_travels_with_the_indices():
    """Persistent workers seeded once by a worker_init_fn: epoch e's draws depend on what the
    workers drew before (a run resumed at epoch 1 would not see the uninterrupted run's epoch 1),
    and a size set in the main process never reaches them (progressive resizing would train at
    the first size throughout). The tagged sampler fixes both."""
    def old_way(start_epoch, epochs):
        dataset = FixedImageSet()
        loader = DataLoader(dataset, batch_size=BATCH, num_workers=WORKERS, persistent_workers=True,
                            worker_init_fn=seed_augment_workers(dataset, 0, 0, start_epoch))
        return [images(list(loader)) for _ in range(epochs)]
    straight, resumed = old_way(0, 2)[1], old_way(1, 1)[0]
    assert n_equal(straight, resumed) == 0

    probe = SizeProbe()
    loader = DataLoader(probe, batch_size=BATCH, num_workers=WORKERS, persistent_workers=True)
    assert set(torch.cat(list(loader)).tolist()) == {32}
    probe.size = 64
    assert set(torch.cat(list(loader)).tolist()) == {32}, "workers saw the main process's new size"
    sampler = EpochSampler(np.zeros(N), shuffle=False, tagged=True)
    loader = DataLoader(SizeProbe(), batch_size=BATCH, sampler=sampler, num_workers=WORKERS, persistent_workers=True)
    for epoch, size in enumerate([32, 48, 64]):
        sampler.set_epoch(epoch, size)
        assert set(torch.cat(list(loader)).tolist()) == {size}


def test_persistent_main_process_and_resume():
    """num_workers=0 takes the same path in this process (as worker 0, = num_workers 1); a loader
    built at a later epoch (resume) gives that epoch's batches."""
    main = persistent_epochs(0, 0, [0, 1], workers=0)
    one = persistent_epochs(0, 0, [0, 1], workers=1)
    assert all(torch.equal(images(x), images(y)) for x, y in zip(main, one))
    assert n_equal(images(main[0]), images(main[1])) == 0
    resumed = persistent_epochs(0, 0, [1])
    assert torch.equal(images(resumed[0]), images(persistent_epochs(0, 0, [0, 1])[1]))


def test_persistent_dataset_pickles_with_its_seeder():
    """'spawn' workers get the dataset by pickle: its on_epoch hook must travel and seed alike.
    (Spawned workers themselves are checked by test_spawn_workers; a second spawn costs ~10 s.)"""
    seeder = EpochSeeder(0, 1, rank=2)
    assert vars(pickle.loads(pickle.dumps(seeder))) == vars(seeder)
    dataset = FixedImageSet()
    dataset.on_epoch = EpochSeeder(0, 0)
    copy = pickle.loads(pickle.dumps(dataset))
    sampler = EpochSampler(np.zeros(N), shuffle=False, tagged=True)
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        got = images(list(DataLoader(copy, batch_size=BATCH, sampler=sampler)))
        assert torch.equal(got, images(persistent_epochs(0, 0, [0, 1], workers=0)[epoch]))


def test_tagged_sampler_carries_epoch_and_size():
    s = EpochSampler(np.zeros(5), shuffle=False, tagged=True)
    s.set_epoch(3, 48)
    items = list(s)
    assert [i.index for i in items] == list(range(5)) and {(i.epoch, i.size) for i in items} == {(3, 48)}
    ds = FixedImageSet()
    ds.size = 32
    assert ds.start_item(items[2]) == 2 and ds.size == 48 and ds.epoch == 3
    assert ds.start_item(4) == 4 and ds.size == 48  # plain indices change nothing


def test_erasing_spares_positive_slices():
    """augment.erasing_on: negatives (the default): CoarseDropout's holes never touch a slice labelled `any`
    (a hole can hide a small lesion whose label stays positive), and still erase negatives; `all` erases
    both. Through SliceDataset, which hands the transform each item's label."""
    import pandas as pd

    from ich.labels import LABELS
    from models.data import SliceDataset
    images = np.full((4, 32, 32, 3), 200, np.uint8)
    table = pd.DataFrame({"cache_row": range(4), **{k: [1, 0, 1, 0] if k in ("any", "subdural") else 0
                                                      for k in LABELS}})
    erased = {}
    for on in ("negatives", "all"):
        cfg = AugmentCfg(hflip=0.0, shift_scale_rotate=0.0, erasing=1.0, erasing_holes=4, erasing_size=0.4,
                         erasing_on=on)
        data = SliceDataset(table, None, size=32, transform=build_train_transform(cfg), images=images)
        seed_transform(data.transform, 0)
        erased[on] = [bool((data[i][0] == 0).any()) for i in range(4)]
    assert erased["negatives"] == [False, True, False, True]
    assert erased["all"] == [True, True, True, True]
