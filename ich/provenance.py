"""The reproducibility record: what made a checkpoint, an OOF table or a submission.

Every `fold{k}.pt`, `oof.parquet` (and `oof_last.parquet`) and
`submission.csv` carries one record (`record`):
- `git`: the commit checked out, or "dirty" when tracked files differ from it
  (`git_head` keeps the commit either way), "unknown" outside a git checkout;
- `config_digest`: sha256 of the config (the experiment's, or the predict
  config's for a submission) as canonical JSON, first 16 hex digits;
- `versions`: torch, timm, pydicom, lightgbm (None when not installed);
- `device`: where it ran (GPU name and process count, or the CPU);
- `cache_files_digest`: the digest of the cache's file list
  (cache_meta.json's `files_digest`: which DICOM files, not how they were
  windowed; the image settings are checked on their own, models.predict_split).

Where it lives, chosen so that each file still loads as it always did:
- `fold{k}.pt`: the `provenance` key of the checkpoint dict;
- parquet files: the schema metadata key `ich.provenance` (JSON), so the
  record travels with the file and pandas reads the table unchanged;
- `submission.csv`: a sidecar `submission.provenance.json`, because the CSV
  itself must stay exactly what Kaggle accepts.
`read_provenance(path)` reads the parquet files and sidecars; a checkpoint's
record is read by the checkpoint format's owner, models.checkpoint
(read_provenance there), so a damaged checkpoint fails there the one way
every checkpoint reader does. No torch import here: stage two and the
submission run without it.
"""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import pandas as pd

from .cache import read_meta, write_atomic

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("torch", "timm", "pydicom", "lightgbm")
PARQUET_KEY = b"ich.provenance"


def git_state(repo: Path = REPO) -> tuple[str, str]:
    """(commit or "dirty", commit): "dirty" when tracked files differ from HEAD; ("unknown", "unknown")
    outside a git checkout (a Kaggle notebook's copy of the code)."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=30)
        if head.returncode:
            return "unknown", "unknown"
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                                capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return "unknown", "unknown"
    commit = head.stdout.strip()
    return ("dirty" if status.returncode or status.stdout.strip() else commit), commit


def config_digest(config: dict) -> str:
    text = json.dumps(config, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def versions() -> dict:
    """Installed versions; an imported module's own __version__ first (torch's names its build: +cu130)."""
    found = {}
    for name in PACKAGES:
        module = sys.modules.get(name)
        try:
            found[name] = str(getattr(module, "__version__", None) or metadata.version(name))
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def record(config: dict, device: str, cache_dir: Path | None) -> dict:
    """The record for an output made now from `config` on `device`, reading the cache in `cache_dir`."""
    git, head = git_state()
    meta = read_meta(cache_dir) if cache_dir is not None else None
    return {"git": git, "git_head": head, "config_digest": config_digest(config), "versions": versions(),
            "device": device, "cache_files_digest": (meta or {}).get("files_digest"),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def write_parquet(table: pd.DataFrame, path: Path, provenance: dict) -> None:
    """table.to_parquet(path, index=False), atomically, with the record in the schema metadata."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    arrow = pa.Table.from_pandas(table, preserve_index=False)
    arrow = arrow.replace_schema_metadata({**(arrow.schema.metadata or {}),
                                           PARQUET_KEY: json.dumps(provenance).encode()})
    write_atomic(Path(path), lambda tmp: pq.write_table(arrow, tmp))


def sidecar(path: Path) -> Path:
    """submission.csv -> submission.provenance.json."""
    path = Path(path)
    return path.with_name(f"{path.stem}.provenance.json")


def write_sidecar(path: Path, provenance: dict) -> Path:
    """The record beside `path` (its sha256 included, so the pair can be checked later)."""
    out = sidecar(path)
    body = {"file": Path(path).name, "sha256": hashlib.sha256(Path(path).read_bytes()).hexdigest(), **provenance}
    write_atomic(out, lambda tmp: tmp.write_text(json.dumps(body, indent=1)))
    return out


def read_provenance(path: Path) -> dict | None:
    """The record of a parquet file or a file with a sidecar; None when it has none.
    (A fold{k}.pt's: models.checkpoint.read_provenance.)"""
    path = Path(path)
    if path.suffix == ".pt":
        raise ValueError(f"{path} is a checkpoint: read its record with models.checkpoint.read_provenance")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq
        raw = (pq.read_schema(path).metadata or {}).get(PARQUET_KEY)
        return json.loads(raw) if raw else None
    side = sidecar(path)
    return json.loads(side.read_text()) if side.is_file() else None


def summary(provenance: dict) -> str:
    """One line: git, config digest, versions, device, cache digest."""
    v = provenance.get("versions") or {}
    git = provenance.get("git")
    if git == "dirty":
        git = f"dirty (on {str(provenance.get('git_head'))[:12]})"
    return (f"git {str(git)[:12]}, config {provenance.get('config_digest')}, "
            + ", ".join(f"{k} {v.get(k)}" for k in PACKAGES)
            + f", device {provenance.get('device')}, cache files {str(provenance.get('cache_files_digest'))[:12]}")
