"""Contract 2's files (ARCHITECTURE.md): where stage one's outputs live, and the test outputs' reuse key
and write. The one place that spells these names: the trainer, test inference (both sources: a test
cache or the test DICOMs), stage two and the Kaggle staging all ask here.

In MODEL_CHECKPOINT_DIR/<experiment>/:
- `fold{k}.pt`, the kept fold model, and `fold{k}.last.pt`, its resume
  state (their format: models.checkpoint);
- `fold{k}.oof.parquet`: fold model k's held-out probabilities;
- per fold model k, once predicted: `test_fold{k}.parquet` (image_id + six
  probabilities, test slice-table order) and, when stage two reads PCA
  features, one of two row-aligned arrays (`kept`, recorded in the key):
  `test_fold{k}_pcs.npy`, the embeddings' aligned PCA scores (float32,
  stage two's `pca_width` columns), through the PCA of `test_pca.joblib`,
  fitted on the OOF embeddings before test inference (stacking.stage_one.
  fit_test_pcas; the default: 0.05 GiB for 3 experiments at the competition's size, width 8), or
  `test_fold{k}_emb.npy`, the float16 pooled embeddings themselves (6.9 GiB
  there; what `pca_alignment: procrustes` needs, or `test_embeddings:
  true`). Stage two builds its test features from each fold model's set
  separately, because each OOF row came from one fold model too; a mean of
  fold models is a distribution no booster trained on;
- `test.parquet`: their mean, for a stage-one-only submission and the
  report; stage two never reads it;
- `test_meta.json`: the key of what made them (`outputs_key`). A rerun reuses
  the outputs only when the key matches: the checkpoints' bytes (a
  retrained fold, a changed TTA or normalization, which live in the
  checkpoint, all change them), the image settings, which test files
  were read from which source, and what was kept of the embeddings.

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


def fold_test_scores(exp_dir: Path, k: int) -> Path:
    """Fold model k's test embeddings through its stage-two PCA (TEST_PCA): what the kernel keeps."""
    return Path(exp_dir) / f"test_fold{k}_pcs.npy"


TEST_PCA = "test_pca.joblib"  # the per-fold-model PCAs the test scores came through ({"spec", "models"})
KEPT = {"embeddings": fold_test_embeddings, "scores": fold_test_scores}


def kept_kind(kept) -> str | None:
    """What a key's `kept` says was written per fold model: "embeddings", "scores" or None (nothing)."""
    return None if kept is None else kept if kept == "embeddings" else "scores"


def fold_test_part(exp_dir: Path, k: int, kind: str) -> Path:
    """Where fold model k's test embeddings (or scores) are written as they come, renamed into place at the end."""
    return Path(exp_dir) / f".test_fold{k}_{'emb' if kind == 'embeddings' else 'pcs'}.part"


def file_digest(path: Path) -> str:
    """SHA-1 of a file's bytes (a checkpoint's: what its test outputs are tied to)."""
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def outputs_key(source: str, checkpoints: dict[int, Path], image_settings: dict, n_files: int,
             files_digest: str, kept=None) -> dict:
    """What one experiment's test outputs depend on; equal keys mean equal outputs (up to float noise).

    source: "cache" (a test image cache) or "dicom" (the test DICOMs,
    streamed); n_files and files_digest: the test files read (the cache's
    cache_meta.json says them for a cache); kept: what is written of the
    embeddings: None (nothing: no PCA features), "embeddings", or the PCA's
    spec (stacking.stage_one.test_pca_spec: width, standardization) for
    their scores, so that another width reruns stage one on test rather than
    reading scores of the wrong PCA."""
    return {"source": source, "checkpoints": {str(k): file_digest(p) for k, p in sorted(checkpoints.items())},
            "image_settings": dict(image_settings), "n_files": int(n_files), "files_digest": files_digest,
            "kept": kept}


def _stored_key(exp_dir: Path):
    try:
        return json.loads((Path(exp_dir) / TEST_META).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def reusable(exp_dir: Path, key: dict) -> bool:
    """The test outputs in exp_dir were made with `key` and every file of them is there."""
    folds = [int(k) for k in key["checkpoints"]]
    kind = kept_kind(key.get("kept"))
    files = [p for k in folds for p in (fold_test_probs(exp_dir, k), *((KEPT[kind](exp_dir, k),) if kind else ()))]
    files += [Path(exp_dir) / TEST_PCA] if kind == "scores" else []
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
                  rows: dict[int, np.ndarray | Path] | None = None, pca=None) -> pd.DataFrame:
    """Every fold model's test outputs, their mean, then the key (last: a kill leaves no key, so nothing
    is reused); returns the mean table. rows[k]: fold model k's embeddings or PCA scores (key["kept"]
    says which), an array or a finished .npy file to rename into place (written as the rows came, no
    second copy); pca: with scores, the PCAs they came through (saved as TEST_PCA, joblib). Files of
    the kind not kept are removed: stage two must not read embeddings of older checkpoints, and the
    disk they took is the point of keeping scores."""
    import joblib

    exp_dir = Path(exp_dir)
    kind = kept_kind(key.get("kept"))
    for k, p in probs.items():
        for other, path in KEPT.items():
            if other != kind:
                path(exp_dir, k).unlink(missing_ok=True)
        if kind:
            if isinstance(rows[k], Path):
                rows[k].replace(KEPT[kind](exp_dir, k))
            else:
                save_npy_atomic(KEPT[kind](exp_dir, k), rows[k])
        write_atomic(fold_test_probs(exp_dir, k), lambda tmp, t=_table(ids, p): t.to_parquet(tmp, index=False))
    if kind == "scores":
        write_atomic(exp_dir / TEST_PCA, lambda tmp: joblib.dump(pca, tmp))
    else:
        (exp_dir / TEST_PCA).unlink(missing_ok=True)
    mean = _table(ids, np.mean([probs[k] for k in probs], axis=0))
    write_atomic(exp_dir / TEST_MEAN, lambda tmp: mean.to_parquet(tmp, index=False))
    write_atomic(exp_dir / TEST_META, lambda tmp: tmp.write_text(json.dumps(key, indent=1)))
    return mean
