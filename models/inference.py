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


def make_loader(dataset, runtime: Runtime, batch_size: int, num_workers: int, *,
                persistent: bool = False) -> DataLoader:
    """Batches in dataset order (each rank its shard). `persistent`: the workers stay for every
    pass of this loader (predict_split runs all fold models of an experiment through one)."""
    sampler = EpochSampler(np.zeros(len(dataset)), shuffle=False, rank=runtime.rank,
                           world_size=runtime.world_size)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      pin_memory=runtime.device.type == "cuda", persistent_workers=persistent and num_workers > 0,
                      prefetch_factor=4 if num_workers else None)


def is_compiled(model) -> bool:
    return getattr(model, "__dict__", {}).get("_compiled") is not None


class HostOutputs:
    """Where predict's outputs land, batch after batch, without the host waiting for the device.

    A `.cpu()` per batch (twice: probabilities and embeddings) made the host
    wait for the batch's last kernel before it could queue the next batch's
    first one, so the GPU idled for that gap and the loader hand-off on every
    batch. Here each batch is copied into preallocated host buffers (pinned
    on CUDA, so the copy is queued and returns at once); `read` waits once,
    at the end. Embeddings become float16 on the device, before the copy
    (half the bytes; the same rounding numpy's astype did on the host).
    """

    def __init__(self, rows: int, dim: int, runtime: Runtime):
        self.cuda = runtime.device.type == "cuda"
        self.device = runtime.device
        self.probs = torch.empty((rows, 6), dtype=torch.float32, pin_memory=self.cuda)
        self.emb = torch.empty((rows, dim), dtype=torch.float16, pin_memory=self.cuda) if dim else None
        self.filled = 0

    def put(self, prob: torch.Tensor, emb: torch.Tensor | None) -> None:
        rows = slice(self.filled, self.filled + len(prob))
        self.probs[rows].copy_(prob.float(), non_blocking=self.cuda)
        if self.emb is not None:
            self.emb[rows].copy_(emb.float().half(), non_blocking=self.cuda)
        self.filled += len(prob)

    def read(self) -> tuple[np.ndarray, np.ndarray | None]:
        if self.cuda:
            torch.cuda.synchronize(self.device)
        emb = self.emb[:self.filled].numpy() if self.emb is not None else None
        return self.probs[:self.filled].numpy(), emb


def padded(x: torch.Tensor, rows: int) -> torch.Tensor:
    """x with its last image repeated up to `rows`: a compiled model then sees one batch shape only
    (a short last batch made torch.compile compile again, for every fold model)."""
    if len(x) >= rows:
        return x
    return torch.cat([x, x[-1:].expand(rows - len(x), *x.shape[1:])])


def forward(model, x, runtime: Runtime, tta_hflip: bool):
    """One device batch -> (probabilities, pooled embeddings), averaged with the flipped image under TTA.

    The one definition of a prediction: validation, OOF, test and the
    benchmark (benchmarks/predict.py) all call it."""
    with runtime.autocast():
        logits, emb = model(x, return_embedding=True)
        prob = model.probabilities(logits)
        if tta_hflip:
            logits_f, emb_f = model(torch.flip(x, dims=[3]), return_embedding=True)
            prob = (prob + model.probabilities(logits_f)) / 2
            emb = (emb + emb_f) / 2
    return prob, emb


@torch.no_grad()
def predict(model, loader: DataLoader, runtime: Runtime, *, tta_hflip: bool = True,
            embeddings: bool = True, desc: str = "predict", progress: bool = True, on_batch=None):
    """-> (probs float32 (n, 6), embeddings float16 (n, d) or None), rows in dataset order.

    The loop never waits for the device (HostOutputs); a compiled model gets
    full batches only (`padded`, the extra rows dropped). on_batch(i), if
    given, runs after batch i is queued (benchmarks/predict.py times the
    steady state with it).
    """
    model.eval()
    n = len(loader.dataset)
    full = loader.batch_size if is_compiled(model) and loader.batch_size else 0
    out, idx_parts = None, []
    for x, _, idx in one_pass(loader, desc=desc, show=progress and runtime.is_main):
        rows = len(x)
        x = padded(x.to(runtime.device, non_blocking=True), full)
        if runtime.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        prob, emb = forward(model, x, runtime, tta_hflip)
        if out is None:
            out = HostOutputs(len(loader.sampler), emb.shape[1] if embeddings else 0, runtime)
        out.put(prob[:rows], emb[:rows])
        idx_parts.append(idx.numpy())
        if on_batch is not None:
            on_batch(len(idx_parts) - 1)
    prob_local, emb_local = out.read() if out is not None else (np.zeros((0, 6), np.float32), None)
    local = (np.concatenate(idx_parts) if idx_parts else np.zeros(0, np.int64), prob_local, emb_local)
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
