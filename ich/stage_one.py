"""Contract 2's files (ARCHITECTURE.md): where stage one's outputs live, and the test outputs' reuse key
and write. The one place that spells these names: the trainer, test inference (both sources: a test
cache or the test DICOMs), stage two and the Kaggle staging all ask here.

In MODEL_CHECKPOINT_DIR/<experiment>/:
- `fold{k}.pt`, the kept fold model, and `fold{k}.last.pt`, its resume
  state (their format: models.checkpoint);
- `fold{k}.oof.parquet`: fold model k's held-out probabilities;
- per fold model k, once predicted: `test_fold{k}.parquet` (image_id + six
  probabilities, test slice-table order) and `test_fold{k}_emb.npy`
  (float16 pooled embeddings, rows aligned). Stage two builds its test
  features from each set separately, because each OOF row came from one
  fold model too; a mean of fold models is a distribution no booster
  trained on;
- `test.parquet`: their mean, for a stage-one-only submission and the
  report; stage two never reads it;
- `test_meta.json`: the key of what made them (`outputs_key`). A rerun reuses
  the outputs only when the key matches: the checkpoints' bytes (a
  retrained fold, a changed TTA or normalization, which live in the
  checkpoint, all change them), the image settings, and which test files
  were read from which source.

No torch here: stage two (stacking) reads these names too.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd

from .cache import save_npy_atomic, write_atomic
from .labels import LABELS

TEST_MEAN = "test.parquet"
TEST_META = "test_meta.json"


def fold_checkpoint(exp_dir: Path, k: int) -> Path:
    return Path(exp_dir) / f"fold{k}.pt"


def resume_state(exp_dir: Path, k: int) -> Path:
    return Path(exp_dir) / f"fold{k}.last.pt"


def fold_oof(exp_dir: Path, k: int) -> Path:
    return Path(exp_dir) / f"fold{k}.oof.parquet"


def fold_checkpoints(exp_dir: Path) -> dict[int, Path]:
    """{k: fold{k}.pt} of an experiment (resume states fold{k}.last.pt excluded), by k."""
    found = {}
    for path in Path(exp_dir).glob("fold*.pt"):
        m = re.fullmatch(r"fold(\d+)\.pt", path.name)
        if m:
            found[int(m.group(1))] = path
    return dict(sorted(found.items()))


def fold_test_probs(exp_dir: Path, k: int) -> Path:
    return Path(exp_dir) / f"test_fold{k}.parquet"


def fold_test_embeddings(exp_dir: Path, k: int) -> Path:
    return Path(exp_dir) / f"test_fold{k}_emb.npy"


def fold_test_embeddings_part(exp_dir: Path, k: int) -> Path:
    """Where fold model k's test embeddings are written as they come, renamed to fold_test_embeddings at the end."""
    return Path(exp_dir) / f".test_fold{k}_emb.part"


def file_digest(path: Path) -> str:
    """SHA-1 of a file's bytes (a checkpoint's: what its test outputs are tied to)."""
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def outputs_key(source: str, checkpoints: dict[int, Path], image_settings: dict, n_files: int,
             files_digest: str) -> dict:
    """What one experiment's test outputs depend on; equal keys mean equal outputs (up to float noise).

    source: "cache" (a test image cache) or "dicom" (the test DICOMs,
    streamed); n_files and files_digest: the test files read (the cache's
    cache_meta.json says them for a cache)."""
    return {"source": source, "checkpoints": {str(k): file_digest(p) for k, p in sorted(checkpoints.items())},
            "image_settings": dict(image_settings), "n_files": int(n_files), "files_digest": files_digest}


def _stored_key(exp_dir: Path):
    try:
        return json.loads((Path(exp_dir) / TEST_META).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def reusable(exp_dir: Path, key: dict) -> bool:
    """The test outputs in exp_dir were made with `key` and every file of them is there."""
    folds = [int(k) for k in key["checkpoints"]]
    files = [p for k in folds for p in (fold_test_probs(exp_dir, k), fold_test_embeddings(exp_dir, k))]
    return _stored_key(exp_dir) == key and all(p.is_file() for p in files + [Path(exp_dir) / TEST_MEAN])


def invalidate(exp_dir: Path) -> None:
    """Before outputs are replaced: never take a half-replaced set for a current one."""
    (Path(exp_dir) / TEST_META).unlink(missing_ok=True)


def read_mean(exp_dir: Path) -> pd.DataFrame:
    return pd.read_parquet(Path(exp_dir) / TEST_MEAN)


def _table(ids, probs: np.ndarray) -> pd.DataFrame:
    table = pd.DataFrame(np.asarray(probs, np.float32), columns=list(LABELS))
    table.insert(0, "image_id", np.asarray(ids))
    return table


def write_outputs(exp_dir: Path, key: dict, ids, probs: dict[int, np.ndarray],
                       embeddings: dict[int, np.ndarray | Path]) -> pd.DataFrame:
    """Every fold model's test outputs, their mean, then the key (last: a kill leaves no key, so nothing
    is reused); returns the mean table. embeddings[k]: an array, or a finished .npy file to rename into
    place (written as the rows came, no second copy)."""
    exp_dir = Path(exp_dir)
    for k, p in probs.items():
        emb = embeddings[k]
        if isinstance(emb, Path):
            emb.replace(fold_test_embeddings(exp_dir, k))
        else:
            save_npy_atomic(fold_test_embeddings(exp_dir, k), emb)
        write_atomic(fold_test_probs(exp_dir, k), lambda tmp, t=_table(ids, p): t.to_parquet(tmp, index=False))
    mean = _table(ids, np.mean([probs[k] for k in probs], axis=0))
    write_atomic(exp_dir / TEST_MEAN, lambda tmp: mean.to_parquet(tmp, index=False))
    write_atomic(exp_dir / TEST_META, lambda tmp: tmp.write_text(json.dumps(key, indent=1)))
    return mean
