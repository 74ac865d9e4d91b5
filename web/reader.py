"""An upload read, sorted out and decoded in its own process, with a memory limit and a hard time limit.

Why a process per upload (measured, BENCHMARKS.md's hostile table): reading
and decoding are where a hostile file costs memory and time (a JPEG 2000
codestream larger than its header, a header of 90,000 empty elements,
60 slices of 4096 x 4096 in a 1.9 MB zip). In a process of its own an upload
- gets an address-space limit (`upload_memory_mb` above what the process
  holds when it starts): a decoder that asks for more fails there, and the
  server's memory never grows by it;
- is killed when its time (`read_seconds`) is up, wherever it is stuck;
- never runs under the model's lock, and never on the server's threads, so
  one upload's files cannot hold another's up beyond sharing the CPU;
- shares the CPU fairly: a reading process still running after
  `DEMOTE_AFTER` seconds (a study of a few hundred slices is read in well
  under a second) is lowered to `DEMOTED_NICE` once a later upload is being
  read beside it or one waits for a turn, so an upload that arrives while
  a hostile or huge one is being read gets the CPU first, whoever sent it.
  Alone, a reading process keeps the server's priority (a busy machine's
  other programs do not push it down). Turns by client address would not
  do it: everyone behind one proxy or NAT (or on this machine) has the
  same one;
- gives its upload's turn back when it is lowered (web.deps.Turn.lower),
  so slow reads cannot hold every turn; when the server's places for slow
  reads are all taken, it is stopped instead (ReadStopped: the server
  answers 503 with Retry-After);
- shares one memory budget with the others (`budget`: their own resident
  memory together, read from /proc every 0.1 s): over it, the largest is
  stopped (ReadStopped). Each has its own limit already, but up to
  `max_uploads + max_slow_reads` of them run at once; the budget bounds
  them together below that many times the limit, and the one that is
  stopped is the one that takes the most;
- prints nothing: its stdout, stderr, warnings and logging go nowhere (a
  library may print a value of a header), and its errors come back as
  reasons.
The processes are forked from a small forkserver (no torch in it) that
imports the readers once, so one starts in milliseconds.

What comes back: the series list (every CT series: whether it is usable, why
not, its description) and, for up to `max_series` usable series within
`max_source_mpx` source megapixels, prepare_data's decode (cache-like
images, slices, rejected) and the slices' slim headers (pipeline.headers).
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import threading
import time
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from ich.config import PrepareConfig
from ich.prepare import decode_files
from ich.study import (MIN_SLICES, Deadline, StudyError, StudyFiles, check_chosen, pick_series, read_headers,
                       series_pixels, unpack_zip)
from pipeline.headers import slim_header


@dataclass(frozen=True)
class Caps:
    max_unpacked: int      # bytes a zip may unpack to
    seconds: float         # read + sort out + decode
    memory: int            # bytes of address space the process may add
    max_series: int
    max_source_pixels: int


@dataclass
class SeriesRead:
    index: int
    files: StudyFiles       # this series picked (its chosen slices, every other file's reason)
    images: object          # numpy n x H x W x windows uint8 (decode_files)
    slices: pd.DataFrame
    rejected: pd.DataFrame
    headers: dict           # image_id -> slim header


@dataclass
class UploadRead:
    series: list[dict]      # {index, series_id, n_files, axial, usable, reason, description, decoded}
    chosen: int
    decoded: list[SeriesRead]  # the chosen series first
    seconds: float


def read_upload(listed: list, work: Path, series_index: int | None, caps: Caps, cfg: PrepareConfig) -> UploadRead:
    """The uploaded files -> UploadRead (in the reading process); StudyError says why a study cannot be used."""
    t0 = time.monotonic()
    deadline, skipped, what = Deadline(caps.seconds), [], "the upload"
    if len(listed) == 1 and zipfile.is_zipfile(listed[0][1]):
        name, path = listed[0]
        listed, skipped = unpack_zip(path, work, max_bytes=caps.max_unpacked, deadline=deadline, name=name)
        what = name
    elif len(listed) == 1 and listed[0][0].lower().endswith(".zip"):
        raise StudyError(f"{listed[0][0]} is not a readable zip file")
    headers = read_headers(listed, skipped=skipped, deadline=deadline)
    files = pick_series(headers, series_index)
    check_chosen(files, what)
    chosen = next(s["index"] for s in headers.series if s["series_id"] == files.series_id)
    listing = [{**s, "usable": False, "reason": None, "description": None, "decoded": False}
               for s in headers.series]
    left, decoded = caps.max_source_pixels, []
    for i in [chosen] + [s["index"] for s in headers.series if s["index"] != chosen]:
        entry = listing[i]
        pixels = series_pixels(headers, i)
        if entry["n_files"] < MIN_SLICES:
            entry["reason"] = f"{entry['n_files']} slice(s): the models read at least {MIN_SLICES} along z"
        elif len(decoded) >= caps.max_series:
            entry["reason"] = (f"not read: one upload is read for at most {caps.max_series} series; upload this "
                               "series alone to see it")
        elif pixels > left:
            entry["reason"] = (f"not read: its slices hold {pixels / 1e6:.0f} megapixels, more than the "
                               f"{left / 1e6:.0f} left of one upload's {caps.max_source_pixels / 1e6:.0f}")
            if i == chosen:
                raise StudyError(f"the chosen series' slices hold {pixels / 1e6:.0f} megapixels, more than one "
                                 f"upload may decode ({caps.max_source_pixels / 1e6:.0f}): upload fewer or smaller "
                                 "slices")
        if entry["reason"]:
            continue
        left -= pixels
        deadline.check()
        picked = files if i == chosen else pick_series(headers, i)
        images, slices, rejected = decode_files([(s["path"], s["file"], s["image_id"]) for s in picked.chosen], cfg)
        deadline.check()
        heads = {s["image_id"]: slim_header(s["path"]) for s in picked.chosen
                 if s["image_id"] in set(slices["image_id"])}
        first = next(iter(heads.values()), None)
        text = " ".join(str(first.get("SeriesDescription") or "").split())[:64] if first is not None else ""
        entry.update(description=text or None, decoded=True, usable=len(slices) > 0,
                     reason=None if len(slices) else "none of its slices could be read")
        decoded.append(SeriesRead(i, picked, images, slices, rejected, heads))
    return UploadRead(listing, chosen, decoded, time.monotonic() - t0)


def _quiet() -> None:
    """Nothing the process prints reaches the server's log: a library may print a header's value."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    warnings.simplefilter("ignore")
    logging.disable(logging.CRITICAL)


def _limit_memory(extra: int) -> None:
    """At most `extra` bytes more of address space (RLIMIT_AS) and of data (RLIMIT_DATA) than the process
    holds now. Both: the forkserver's threads left malloc arenas reserved but unused (PROT_NONE), which
    count as address space already, so an allocation made inside them passed the address-space limit
    (measured: 4 slices of 4096 x 4096 decoded under +4 MB of it); making them writable counts as data."""
    import resource

    with open("/proc/self/status") as f:
        status = {k: int(v.split()[0]) << 10 for k, v in (line.split(":", 1) for line in f)
                  if k in ("VmSize", "VmData")}
    for limit, now in ((resource.RLIMIT_AS, status["VmSize"]), (resource.RLIMIT_DATA, status["VmData"])):
        _, hard = resource.getrlimit(limit)
        want = now + extra
        resource.setrlimit(limit, (want if hard == resource.RLIM_INFINITY else min(want, hard), hard))


def _child(conn, listed, work, series_index, caps: Caps, cfg: PrepareConfig) -> None:
    _quiet()
    try:
        import cv2
        cv2.setNumThreads(1)
        if os.path.exists("/proc/self/status"):
            _limit_memory(caps.memory)
        conn.send(("ok", read_upload(listed, work, series_index, caps, cfg)))
    except StudyError as exc:
        conn.send(("error", str(exc)))
    except MemoryError:
        conn.send(("error", f"reading this upload needs more memory than one upload may take "
                            f"({caps.memory >> 20} MB): upload fewer or smaller slices"))
    except BaseException as exc:  # noqa: BLE001 - the type only: a message may name a file
        conn.send(("failed", type(exc).__name__))
    finally:
        conn.close()


DEMOTE_AFTER = 1.0   # seconds a reading process runs at the server's own priority
DEMOTED_NICE = 10    # then: about a tenth of the CPU share of a process at nice 0 (Linux CFS weights)


def demote(pid: int) -> None:
    """Every thread of process pid at least DEMOTED_NICE nicer than this server (a nice value is per
    thread on Linux; the reader's libraries may have started threads). Raising nice needs no privilege."""
    want = min(19, os.getpriority(os.PRIO_PROCESS, 0) + DEMOTED_NICE)
    tasks = Path(f"/proc/{pid}/task")
    for tid in [int(t.name) for t in tasks.iterdir()] if tasks.is_dir() else [pid]:
        try:
            if os.getpriority(os.PRIO_PROCESS, tid) < want:
                os.setpriority(os.PRIO_PROCESS, tid, want)
        except OSError:  # the thread or the process ended meanwhile
            pass


PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def own_memory(pid: int | None) -> int:
    """Bytes of process pid's resident memory that are not file-backed (statm's resident less shared:
    its heap and its copies of the forkserver's pages; the libraries mapped from files, shared by every
    reader, are not counted); 0 when it is not running."""
    if not pid:
        return 0
    try:
        with open(f"/proc/{pid}/statm") as f:
            resident, shared = f.read().split()[1:3]
        return max(0, int(resident) - int(shared)) * PAGE
    except (OSError, ValueError):
        return 0


class ReadFailed(RuntimeError):
    """The reading process failed in an unexpected way (the type of its error, no message)."""


class ReadStopped(RuntimeError):
    """The read was slow when others wanted its turn, and every place for slow reads was taken: its process
    was killed (the upload may be sent again later)."""


class Reader:
    """Starts one reading process per upload (`read`, blocking: call it from a thread) and stops them all
    at `close`."""

    def __init__(self, cfg: PrepareConfig, budget: int | None = None):
        """budget: bytes all reading processes together may hold (own_memory); None: no such budget."""
        self.cfg, self.budget = cfg, budget
        self.ctx = multiprocessing.get_context("forkserver")
        self.ctx.set_forkserver_preload([__name__])
        self.stopping = threading.Event()
        self._running: dict = {}  # process -> when it started (time.monotonic)
        self._lock = threading.Lock()

    def read(self, listed: list, work: Path, series_index: int | None, caps: Caps, turn=None) -> UploadRead:
        """turn: the upload's web.deps.Turn (None: no turns, a read is only lowered in priority)."""
        if self.stopping.is_set():
            raise StudyError("the server is stopping")
        receive, send = self.ctx.Pipe(duplex=False)
        proc = self.ctx.Process(target=_child, args=(send, listed, work, series_index, caps, self.cfg), daemon=True)
        start = time.monotonic()
        with self._lock:
            self._running[proc] = start
        try:
            proc.start()
            send.close()
            end = start + caps.seconds + 2  # its own deadline first, with its reasons
            demoted = False
            while not receive.poll(0.1):
                if (not demoted and time.monotonic() - start > DEMOTE_AFTER
                        and (self._later_than(start) or (turn is not None and turn.wanted()))):
                    if turn is not None and not turn.lower():
                        raise ReadStopped("the server is reading other slow uploads: try again later")
                    demote(proc.pid)
                    demoted = True
                if self.stopping.is_set():
                    raise StudyError("the server is stopping")
                if self.budget is not None and self._largest_over_budget() == proc.pid:
                    raise ReadStopped("the server is reading other uploads that take its memory: try again later")
                if not proc.is_alive() and not receive.poll(0):
                    raise StudyError("reading the upload failed: its process ended without an answer (out of "
                                     "memory?): upload fewer or smaller slices")
                if time.monotonic() > end:
                    raise StudyError(f"reading the study took more than {caps.seconds:g} s: refused (a study of a "
                                     "few hundred slices takes seconds)")
            try:
                kind, value = receive.recv()
            except (EOFError, OSError):
                raise StudyError("reading the upload failed: its process ended without an answer (out of "
                                 "memory?): upload fewer or smaller slices") from None
        finally:
            receive.close()
            if proc.is_alive():
                proc.kill()
            proc.join(5)
            with self._lock:
                self._running.pop(proc, None)
        if kind == "failed":
            raise ReadFailed(value)
        if kind == "error":
            raise StudyError(value)
        return value

    def _largest_over_budget(self) -> int | None:
        """The pid of the reading process that holds the most memory, when all of them hold more than the
        budget together (None otherwise)."""
        with self._lock:
            pids = [proc.pid for proc in self._running]
        sizes = {pid: own_memory(pid) for pid in pids if pid}
        if not sizes or sum(sizes.values()) <= self.budget:
            return None
        return max(sizes, key=sizes.get)

    def _later_than(self, start: float) -> bool:
        """Whether an upload that started after `start` is being read now."""
        with self._lock:
            return any(t > start for t in self._running.values())

    def close(self) -> None:
        self.stopping.set()
        with self._lock:
            for proc in list(self._running):
                if proc.is_alive():
                    proc.kill()
