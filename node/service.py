"""The node at work: series completion, a bounded queue behind the model, the SR into the outbox.

Series completion, as gateways do it: a series is complete `quiet_seconds` after its last instance
arrived, or `max_wait_seconds` after its first, whichever comes first. It then joins a bounded queue
(`max_queued`) in front of one worker that holds the model (the engine is loaded once; inference is
CPU- or GPU-bound, so one series at a time); when the queue is full, complete series wait on disk.
The worker sorts the series' files out (ich.study.choose_series: each file that is no usable axial
CT slice gets its reason), runs the engine (pipeline.study.predict_study's result), builds the SR
(pipeline.sr.build_sr; source UIDs kept where they are valid, so the SR lands in the source study)
with the files not used and why as a comment, puts it in the outbox (node.deliver) and then marks
the series answered (node.spool).

A late instance (one an SR has not answered) reopens its series: after the quiet window the whole
series is read again and a new SR names the earlier one in its Predecessor Documents Sequence.
A series with no usable CT slice (an MR, a dose report) is answered with no SR and a log line.
Log lines name series by a hash, never by UID or patient data.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from pathlib import Path

import pydicom

from ich.labels import LABELS
from ich.study import StudyError, choose_series, reason_summary
from pipeline.sr import build_sr, sr_bytes
from pipeline.study import check_chosen

from .deliver import Outbox
from .scp import OUT_OF_RESOURCES, make_ae
from .spool import Spool, digest, sr_uids

log = logging.getLogger("ich.node")
MAX_TRIES = 3  # a series whose processing fails (not for its content: that is a StudyError) is tried this often


class DicomNode:
    def __init__(self, cfg, run, model: dict, *, store_add=None):
        """run(StudyFiles) -> pipeline.result.StudyResult (predict_study's); store_add(result) -> its id in the
        web app's store (dicom_node.py --web-port)."""
        self.cfg, self.run, self.model, self.store_add = cfg, run, model, store_add
        self.spool, self.outbox = Spool(cfg.work_dir), Outbox(cfg.work_dir, cfg)
        self.queue: queue.Queue = queue.Queue(maxsize=cfg.max_queued)
        self.lock = threading.Lock()
        self.pending: dict[str, list[float]] = {}  # key -> [first, last] arrival of unanswered instances
        self.queued: set[str] = set()
        self.failures: dict[str, int] = {}
        self.sizes: dict[str, list[int]] = {}  # key -> [bytes, files]
        self.spool_bytes = 0
        self.stopping = threading.Event()
        self.server = None
        self.threads: list[threading.Thread] = []
        self._recover()

    def _recover(self) -> None:
        """Every series with instances no SR answered waits one quiet window, then is processed."""
        now = time.monotonic()
        for key in self.spool.keys():
            size, files = self.spool.series_size(key)
            self.sizes[key] = [size, files]
            self.spool_bytes += size
            if self.spool.unanswered(key):
                self.pending[key] = [now, now]
        if self.pending:
            log.info("start-up: %d series received but not answered: processed after the quiet window",
                     len(self.pending))

    # --- receiving -----------------------------------------------------------------------------
    def receive(self, study: str, series: str, sop: str, data: bytes) -> int:
        key = digest(study, series)
        with self.lock:
            size, files = self.sizes.get(key, [0, 0])
            if self.spool_bytes + len(data) > self.cfg.max_spool_mb << 20:
                self._clean_locked(0)  # answered series make room before an instance is refused
            if not self.spool.has(study, series, sop) and (
                    size + len(data) > self.cfg.max_series_mb << 20 or files + 1 > self.cfg.max_series_files
                    or self.spool_bytes + len(data) > self.cfg.max_spool_mb << 20):
                log.warning("C-STORE refused (out of resources): series %s or the spool is at its cap", key[:8])
                return OUT_OF_RESOURCES
            key, new = self.spool.add(study, series, sop, data)
            if new:
                self.sizes[key] = [size + len(data), files + 1]
                self.spool_bytes += len(data)
                now = time.monotonic()
                self.pending.setdefault(key, [now, now])[1] = now
        return 0x0000

    # --- completion and the model --------------------------------------------------------------
    def _schedule(self) -> None:
        last_clean = time.monotonic()
        while not self.stopping.wait(0.1):
            now = time.monotonic()
            with self.lock:
                due = [k for k, (first, last) in self.pending.items() if k not in self.queued
                       and (now - last >= self.cfg.quiet_seconds or now - first >= self.cfg.max_wait_seconds)]
                for key in due:
                    try:
                        self.queue.put_nowait(key)
                    except queue.Full:
                        break  # it waits on disk; the next round tries again
                    del self.pending[key]
                    self.queued.add(key)
            if now - last_clean > 60:
                last_clean = now
                self._clean()

    def _clean(self) -> None:
        with self.lock:
            n = self._clean_locked(self.cfg.keep_answered_seconds)
        if n:
            log.info("%d answered series deleted from the spool", n)

    def _clean_locked(self, keep_seconds: float) -> int:
        """Delete the answered series with nothing new for keep_seconds (self.lock held); -> how many."""
        n = 0
        for key in self.spool.keys():
            if key not in self.pending and key not in self.queued and self.spool.clean_one(key, keep_seconds):
                self.spool_bytes -= self.sizes.pop(key, [0, 0])[0]
                n += 1
        return n

    def _work(self) -> None:
        while not self.stopping.is_set():
            try:
                key = self.queue.get(timeout=0.2)
            except queue.Empty:
                continue
            try:
                self.process(key)
                self.failures.pop(key, None)
            except Exception as exc:  # noqa: BLE001 - one series' failure must not stop the node
                n = self.failures[key] = self.failures.get(key, 0) + 1
                again = n < MAX_TRIES  # a busy model (the web app's queue) passes; a broken series does not
                log.error("series %s: processing failed (%s)%s", key[:8], type(exc).__name__,
                          "; tried again after the quiet window" if again else
                          f" {n} times: its instances stay in the spool until the next start")
                if again:
                    with self.lock:
                        now = time.monotonic()
                        self.pending.setdefault(key, [now, now])
            finally:
                with self.lock:
                    self.queued.discard(key)

    def process(self, key: str) -> None:
        t0 = time.time()
        instances = self.spool.instances(key)
        if not self.spool.unanswered(key):
            return
        state = self.spool.state(key)
        listed = [(p.name, p) for p in instances]
        try:
            files = choose_series(listed)
            check_chosen(files, "the series")
            result = self.run(files)
        except StudyError as exc:
            log.info("series %s: %d instance(s), not processed: %s", key[:8], len(instances),
                     " ".join(str(exc).split()))
            self.spool.answer(key, instances, None)
            return
        skipped = result.skipped
        notes = [f"{len(skipped)} of the series' {len(instances)} files not used: {reason_summary(skipped)}"] \
            if skipped else []
        replaces = []
        if state["srs"]:
            last = state["srs"][-1]
            ds = pydicom.Dataset()
            ds.StudyInstanceUID, ds.SeriesInstanceUID = last["study"], last["series"]
            ds.SOPInstanceUID, ds.SOPClassUID = last["sop"], last["class"]
            replaces = [ds]
        sr = build_sr(result.headers, result.slices, model=self.model, threshold=self.cfg.threshold,
                      replaces=replaces, uids=sr_uids(key, instances), notes=notes)
        data = sr_bytes(sr)
        probs = result.slices[list(LABELS)]
        top = float(probs["any"].max())
        notice = {"study": str(sr.StudyInstanceUID), "series": str(state["series"]),
                  "sr_sop_instance": str(sr.SOPInstanceUID), "any_probability": round(top, 6),
                  "above_threshold": bool(top >= self.cfg.threshold), "threshold": self.cfg.threshold,
                  "slices": len(probs), "files_not_used": len(skipped), "replaces": bool(replaces),
                  "viewer": None}
        if self.store_add is not None:
            study_id = self.store_add(result)
            if self.cfg.viewer_url:
                notice["viewer"] = f"{self.cfg.viewer_url.rstrip('/')}/?result={study_id}"
        name = f"{key}-{len(state['srs']) + 1}"
        self.outbox.put(name, data, notice)
        self.spool.answer(key, instances, {"study": str(sr.StudyInstanceUID), "series": str(sr.SeriesInstanceUID),
                                           "sop": str(sr.SOPInstanceUID), "class": str(sr.SOPClassUID)})
        log.info("series %s: %d slices, %d files not used%s, any %.3f (%s threshold), SR %s%s in %.2f s%s",
                 key[:8], len(probs), len(skipped), f" ({reason_summary(skipped)})" if skipped else "", top,
                 "above" if notice["above_threshold"] else "below", name, " (replaces the earlier one)"
                 if replaces else "", time.time() - t0, f"; viewer {notice['viewer']}" if notice["viewer"] else "")

    # --- running -------------------------------------------------------------------------------
    def start(self) -> None:
        ae, handlers = make_ae(self.cfg, self.receive)
        self.server = ae.start_server((self.cfg.host, self.cfg.port), block=False, evt_handlers=handlers)
        for target, name in ((self._schedule, "ich-node-schedule"), (self._work, "ich-node-model"),
                             (lambda: self.outbox.run(self.stopping), "ich-node-send")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self.threads.append(thread)
        log.info("DICOM node %s listening on %s:%d", self.cfg.ae_title, self.cfg.host, self.cfg.port)

    def stop(self) -> None:
        self.stopping.set()
        self.outbox.wake.set()
        if self.server is not None:
            self.server.shutdown()
        for thread in self.threads:
            thread.join(timeout=30)


def engine_runner(engine):
    """The standalone node's run(): predict_study on the node's own engine (one worker thread calls it)."""
    from pipeline.study import predict_study

    return lambda files: predict_study(files, engine, log=lambda *a: None)
