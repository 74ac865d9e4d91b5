"""The SR back: C-STORE to each configured destination and/or STOW-RS, then the webhook, with retries.

Why an outbox on disk: a PACS may be down or busy for minutes, and the node may be stopped while an
SR waits; an SR is written to `outbox/` before its series counts as answered (node.spool), each
target it still owes is kept beside it, and a sender thread works through them with exponential
backoff (`backoff_seconds`, doubled after each failure, `retries` times). An SR that still could not
be sent moves to `failed/` with a log line (each target has its own `retries`): never lost, never sent twice (a target is dropped from the
list once it has answered success; after a crash between the two, the same SR - same SOP Instance
UID - is sent again, which a PACS stores once).
"""
from __future__ import annotations

import io
import json
import logging
import os
import threading
import time
from pathlib import Path

import pydicom

from .spool import write_json

log = logging.getLogger("ich.node")


def c_store(cfg, dest, ds: pydicom.Dataset) -> None:
    """Send one SR to one destination by C-STORE; RuntimeError with the reason when it is not stored."""
    from pynetdicom import AE
    from pynetdicom.sop_class import ComprehensiveSRStorage
    from pydicom.uid import ExplicitVRLittleEndian

    ae = AE(ae_title=cfg.send_source_ae or cfg.ae_title)
    ae.add_requested_context(ComprehensiveSRStorage, ExplicitVRLittleEndian)
    assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title)
    if not assoc.is_established:
        raise RuntimeError(f"no association with {dest.ae_title} at {dest.host}:{dest.port}")
    try:
        status = assoc.send_c_store(ds)
    finally:
        assoc.release()
    code = getattr(status, "Status", None)
    if code not in (0x0000, 0xB000, 0xB007, 0xB006):  # success, or stored with a warning
        raise RuntimeError(f"{dest.ae_title} answered the C-STORE with status {code}")


def stow(cfg, ds: pydicom.Dataset) -> None:
    """Send one SR by STOW-RS (dicomweb-client) to cfg.stow_url; its own retrying is off (ours applies)."""
    from dicomweb_client.api import DICOMwebClient

    client = DICOMwebClient(url=cfg.stow_url, timeout=30)
    client.set_http_retry_params(retry=False)
    client.store_instances([ds])


def webhook(cfg, notice: dict) -> None:
    import httpx

    httpx.post(cfg.webhook_url, json=notice, timeout=10).raise_for_status()


class Outbox:
    def __init__(self, root: str | Path, cfg):
        self.cfg = cfg
        self.dir, self.failed = Path(root) / "outbox", Path(root) / "failed"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.failed.mkdir(exist_ok=True)
        self.wake = threading.Event()

    def targets(self) -> list[str]:
        return ([f"dimse:{i}" for i in range(len(self.cfg.destinations))] + (["stow"] if self.cfg.stow_url else [])
                + (["webhook"] if self.cfg.webhook_url else []))

    def put(self, name: str, data: bytes, notice: dict) -> None:
        """Queue one SR (its bytes) and its notice for every target; on disk before this returns."""
        path = self.dir / f"{name}.dcm"
        tmp = path.with_name(f".{path.name}.part")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        write_json(self.dir / f"{name}.json", {"targets": self.targets(), "attempts": 0, "next": 0,
                                                "notice": notice})
        self.wake.set()

    def pending(self) -> int:
        return len(list(self.dir.glob("*.json")))

    def _send(self, target: str, ds: pydicom.Dataset, notice: dict) -> None:
        if target.startswith("dimse:"):
            c_store(self.cfg, self.cfg.destinations[int(target[6:])], ds)
        elif target == "stow":
            stow(self.cfg, ds)
        elif target == "webhook":
            webhook(self.cfg, notice)

    def run_once(self) -> float:
        """Try every SR that is due; -> seconds until the next one is due (or 1 s)."""
        wait = 1.0
        for meta_path in sorted(self.dir.glob("*.json")):
            state = json.loads(meta_path.read_text())
            now = time.time()
            if state["next"] > now:
                wait = min(wait, state["next"] - now)
                continue
            sr_path = meta_path.with_suffix(".dcm")
            ds = pydicom.dcmread(io.BytesIO(sr_path.read_bytes()))
            for target in list(state["targets"]):
                try:
                    self._send(target, ds, state["notice"])
                except Exception as exc:  # noqa: BLE001 - a network or peer failure: retried below
                    log.warning("sending an SR to %s failed (attempt %d): %s", target, state["attempts"] + 1,
                                " ".join(str(exc).split())[:200])
                    break
                state["targets"].remove(target)
                state["attempts"], state["next"] = 0, 0  # each target has its own retries
                write_json(meta_path, state)
            if not state["targets"]:
                log.info("SR %s delivered", meta_path.stem)
                sr_path.unlink()
                meta_path.unlink()
                continue
            state["attempts"] += 1
            if state["attempts"] > self.cfg.retries:
                log.error("SR %s could not be sent after %d attempts: kept in %s", meta_path.stem,
                          state["attempts"], self.failed)
                write_json(meta_path, state)
                os.replace(sr_path, self.failed / sr_path.name)
                os.replace(meta_path, self.failed / meta_path.name)
                continue
            state["next"] = time.time() + self.cfg.backoff_seconds * 2 ** (state["attempts"] - 1)
            write_json(meta_path, state)
            wait = min(wait, self.cfg.backoff_seconds)
        return wait

    def run(self, stopping: threading.Event) -> None:
        while not stopping.is_set():
            try:
                wait = self.run_once()
            except Exception:  # noqa: BLE001 - keep the sender alive; the file stays for the next round
                log.exception("the SR sender failed; it tries again")
                wait = 1.0
            self.wake.wait(wait)
            self.wake.clear()
