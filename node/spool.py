"""What the node received, on disk, one folder a series, until the series is answered (and a while after).

Why on disk: a series is complete only when it has been quiet for a while, the model works on one
series at a time, and the node may be stopped (kill -9, a power cut) at any moment; a PACS does not
send again what it was told is stored. So every instance is written (through a temporary name and a
rename) before its C-STORE is answered, and a series' state file says which instances an SR has
answered, written only after that SR is in the outbox (node.deliver). On a start, every series with
instances no SR has answered is processed again; SR UIDs are made from the series and its instances
(`sr_uids`), so one processed again after a crash gives the very SR it gave before, never a second.

Layout under the work dir (mode 0700): `spool/<key>/<instance>.dcm` and `spool/<key>/series.json`,
where key and instance are hashes of the UIDs (no patient data in names or logs).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from pathlib import Path


STATE = "series.json"


def digest(*parts: str) -> str:
    return hashlib.sha256("\\".join(parts).encode()).hexdigest()[:20]


def write_json(path: Path, data: dict) -> None:
    """Through a temporary name and a rename: a crash leaves the old file or the new one, never half."""
    tmp = path.with_name(f".{path.name}.part")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


class Spool:
    def __init__(self, root: str | Path):
        self.root = Path(root) / "spool"
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(Path(root), 0o700)
        for part in self.root.glob("*/.*.part"):  # a write cut short by a crash: its C-STORE was never answered
            part.unlink(missing_ok=True)

    def folder(self, key: str) -> Path:
        return self.root / key

    def has(self, study: str, series: str, sop: str) -> bool:
        return (self.folder(digest(study, series)) / f"{digest(sop)}.dcm").exists()

    def add(self, study: str, series: str, sop: str, data: bytes) -> tuple[str, bool]:
        """Write one instance -> (series key, whether it is new to the series: not a copy sent again)."""
        key = digest(study, series)
        folder = self.folder(key)
        if not folder.is_dir():
            folder.mkdir()
            write_json(folder / STATE, {"study": study, "series": series, "answered": [], "srs": []})
        path = folder / f"{digest(sop)}.dcm"
        new = not path.exists()
        tmp = folder / f".{path.name}.part"
        tmp.write_bytes(data)
        os.replace(tmp, path)
        return key, new

    def instances(self, key: str) -> list[Path]:
        return sorted(self.folder(key).glob("*.dcm"))

    def state(self, key: str) -> dict:
        return json.loads((self.folder(key) / STATE).read_text())

    def unanswered(self, key: str) -> list[Path]:
        answered = set(self.state(key)["answered"])
        return [p for p in self.instances(key) if p.stem not in answered]

    def answer(self, key: str, instances: list[Path], sr: dict | None) -> None:
        """Record that these instances are answered (by the SR `sr`: its UIDs; None: nothing to report)."""
        state = self.state(key)
        state["answered"] = sorted(set(state["answered"]) | {p.stem for p in instances})
        state["answered_at"] = time.time()
        if sr is not None:
            state["srs"].append(sr)
        write_json(self.folder(key) / STATE, state)

    def keys(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if p.is_dir())

    def size(self) -> int:
        return sum(p.stat().st_size for p in self.root.glob("*/*.dcm"))

    def series_size(self, key: str) -> tuple[int, int]:
        """(bytes, files) of a series."""
        files = self.instances(key) if self.folder(key).is_dir() else []
        return sum(p.stat().st_size for p in files), len(files)

    def clean_one(self, key: str, keep_seconds: float) -> bool:
        """Delete an answered series with nothing new for keep_seconds; -> whether it was deleted."""
        try:
            state = self.state(key)
        except (OSError, ValueError):
            return False
        if state.get("answered_at") and time.time() - state["answered_at"] > keep_seconds \
                and not self.unanswered(key):
            shutil.rmtree(self.folder(key), ignore_errors=True)
            return True
        return False


def sr_uids(key: str, instances: list[Path]) -> tuple[str, str]:
    """(series, SOP instance) UIDs of the SR that answers these instances of a series: the same inputs,
    the same UIDs, so an SR made again after a crash replaces itself in the PACS instead of adding one."""
    names = "\\".join(sorted(p.stem for p in instances))
    return tuple(f"2.25.{uuid.uuid5(uuid.NAMESPACE_OID, f'ich-node {what} {key} {names}').int}"
                 for what in ("series", "sr"))
