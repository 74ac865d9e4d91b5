"""Inference: probabilities and pooled embeddings, with horizontal-flip TTA.

Used for validation, out-of-fold predictions after each fold and the test
set (predict.py): one function, so the three cannot drift apart. The
probabilities come from the model's own `probabilities()`, which puts them on
the real label prior whatever sampler trained it (models.net). Under torchrun each rank predicts its shard and rank 0 gets the
whole result back in the original order.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .data import EpochSampler
from .runtime import Runtime


def one_pass(loader, *, desc: str, show: bool):
    """A progress bar over one pass of `loader` that starts exactly one pass.

    tqdm.auto's class (tqdm_asyncio) calls iter() on what it is given as soon
    as it is built, and iterates it again when used. Given a DataLoader that
    is two passes: the first is dropped after its workers have started and
    loaded prefetch_factor x num_workers batches for nothing (every epoch,
    every validation, every fold model's test pass), and with persistent
    workers it would also draw augmentations from the epoch's stream that no
    batch shows. Given the pass's own iterator, it is one.
    """
    return tqdm(iter(loader), total=len(loader), desc=desc, leave=False, disable=not show, unit="batch")


def make_loader(dataset, runtime: Runtime, batch_size: int, num_workers: int) -> DataLoader:
    sampler = EpochSampler(np.zeros(len(dataset)), shuffle=False, rank=runtime.rank,
                           world_size=runtime.world_size)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      pin_memory=runtime.device.type == "cuda", persistent_workers=False,
                      prefetch_factor=4 if num_workers else None)


@torch.no_grad()
def predict(model, loader: DataLoader, runtime: Runtime, *, tta_hflip: bool = True,
            embeddings: bool = True, desc: str = "predict", progress: bool = True):
    """-> (probs float32 (n, 6), embeddings float16 (n, d) or None), rows in dataset order."""
    model.eval()
    n = len(loader.dataset)
    idx_parts, prob_parts, emb_parts = [], [], []
    for x, _, idx in one_pass(loader, desc=desc, show=progress and runtime.is_main):
        x = x.to(runtime.device, non_blocking=True)
        if runtime.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with runtime.autocast():
            logits, emb = model(x, return_embedding=True)
            prob = model.probabilities(logits)
            if tta_hflip:
                logits_f, emb_f = model(torch.flip(x, dims=[3]), return_embedding=True)
                prob = (prob + model.probabilities(logits_f)) / 2
                emb = (emb + emb_f) / 2
        idx_parts.append(idx.numpy())
        prob_parts.append(prob.cpu().numpy())
        if embeddings:
            emb_parts.append(emb.float().cpu().numpy().astype(np.float16))
    local = (np.concatenate(idx_parts) if idx_parts else np.zeros(0, np.int64),
             np.concatenate(prob_parts) if prob_parts else np.zeros((0, 6), np.float32),
             np.concatenate(emb_parts) if emb_parts else None)
    parts = runtime.gather(local)
    probs = np.zeros((n, 6), np.float32)
    emb_all = None
    for idx, p, e in parts:  # padded duplicates simply overwrite with the same values
        probs[idx] = p
        if embeddings and e is not None:
            if emb_all is None:
                emb_all = np.zeros((n, e.shape[1]), np.float16)
            emb_all[idx] = e
    return probs, emb_all
