"""The fold checkpoint format (contract 2: `fold{k}.pt`, the kept fold model, and `fold{k}.last.pt`, its
resume state): one writer and one reader, so every reader fails the same way.

`fold{k}.pt` is a dict: `state_dict` (weights plus the buffers inference
needs: normalization `mean`/`std` and the sampler correction `neg_keep`),
`config` (the experiment config), `fold`, `epoch`, `val_wlogloss`,
`selected`, `in_chans`, `average_last`, `image_settings` (the train cache's,
which test images must match) and `provenance` (ich.provenance's record).
Every file is written atomically (temporary file + rename) and read with
torch.load(weights_only=True).

Any reader (test inference, a study, the web app's start-up, the report's
Grad-CAM, the provenance check of predict.py) goes through `read`: a 0-byte,
truncated or foreign file is a CheckpointError with one line naming the
file and what to do, never torch's traceback.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from ich.cache import write_atomic

from .config import from_dict
from .net import SliceNet
from .runtime import Runtime

FOLD_KEYS = ("state_dict", "config")                                # what every fold{k}.pt holds
RESUME_KEYS = ("model", "optimizer", "scheduler", "scaler", "epoch")  # what every fold{k}.last.pt holds
INFERENCE_BUFFERS = ("mean", "std", "neg_keep")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names it and says what to do, in one line."""


def _fold_of(path: Path) -> str:
    m = re.match(r"fold(\d+)", Path(path).name)
    return m.group(1) if m else "K"


def _retrain(path: Path) -> str:
    return f"retrain that fold (train.py --folds {_fold_of(path)} --force)"


def read(path: Path, map_location="cpu", *, keys=FOLD_KEYS, mmap: bool = False, fix: str | None = None) -> dict:
    """torch.load of a checkpoint, or a CheckpointError: unreadable (0 bytes, truncated, not a torch file,
    pickled objects weights_only refuses) or not a dict with `keys` (someone else's .pt). fix: what the
    message tells the user to do (default: retrain that fold)."""
    path = Path(path)
    fix = fix or _retrain(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception:  # noqa: BLE001 - any unreadable file: name it, in one line (the same for every reader)
        size = path.stat().st_size if path.is_file() else None
        raise CheckpointError(f"checkpoint {path} is damaged or incomplete ("
                              f"{'missing' if size is None else f'{size:,} bytes'}, not a readable torch file): "
                              f"{fix}") from None
    if not isinstance(state, dict) or not all(k in state for k in keys):
        raise CheckpointError(f"{path} is not a checkpoint of train.py (no {', '.join(keys)}): {fix}")
    return state


def read_provenance(path: Path) -> dict | None:
    """The reproducibility record (ich.provenance) of a fold{k}.pt; None for one written before it existed.
    Memory-mapped: the weights are not read."""
    return read(path, mmap=True).get("provenance")


def read_resume(path: Path, map_location) -> dict:
    """A fold{k}.last.pt (train.py --resume)."""
    k = _fold_of(path)
    return read(path, map_location, keys=RESUME_KEYS,
                fix=f"it holds the only resume state of fold {k}, so retrain it: train.py --folds {k} --force")


def save(obj: dict, path: Path) -> None:
    """A checkpoint dict -> path, atomically."""
    write_atomic(path, lambda tmp: torch.save(obj, tmp))


def save_fold(path: Path, model: SliceNet, cfg, *, fold: int, epoch: int, score: float, image_settings: dict,
              provenance: dict | None) -> None:
    """The kept fold model (the module docstring lists what it holds)."""
    save({"state_dict": model.state_dict(), "config": cfg.to_dict(), "fold": fold, "epoch": epoch,
          "val_wlogloss": score, "selected": cfg.train.checkpoint, "in_chans": model.in_chans,
          "average_last": cfg.train.average_last, "image_settings": image_settings, "provenance": provenance},
         path)


def load_fold_model(path: Path, runtime: Runtime):
    """A fold checkpoint -> (model on the device, its experiment config, the checkpoint dict without weights).

    No pretrained file is needed: the weights, the normalization and the
    sampler correction all come from the checkpoint.
    """
    state = read(path)
    cfg = from_dict(state["config"], where=str(path))
    missing = set(INFERENCE_BUFFERS) - set(state["state_dict"])
    if missing:
        raise CheckpointError(f"{path} was written by an older version that did not store "
                              f"{', '.join(sorted(missing))} with the weights: {_retrain(path)}")
    info = {k: v for k, v in state.items() if k != "state_dict"}
    in_chans = int(state.get("in_chans", 3))
    model = SliceNet(cfg.model.backbone, None, cfg.model.dropout, in_chans)  # weights: below
    try:
        model.load_state_dict(state["state_dict"])
    except RuntimeError as exc:
        raise CheckpointError(f"{path} does not fit its own config ({' '.join(str(exc).split())[:200]}): "
                              f"{_retrain(path)}") from None
    model = model.to(runtime.device)
    if runtime.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model, cfg, info
