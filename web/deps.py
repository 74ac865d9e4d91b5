"""What the routes share, as FastAPI dependencies: the server's parts, a stored upload by id, one series'
result (`?series=K`, default the upload's chosen series) and a download's threshold."""
from __future__ import annotations

import asyncio
import itertools
import math
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import Depends, Query, Request

from pipeline.result import StudyResult

from .engine import WebEngine
from .errors import GONE, ApiError
from .reader import Reader
from .render import Renders
from .settings import ServerSettings
from .store import StoredStudy, StudyStore
from .uploads import WorkDir


class Slots:
    """Uploads in flight, in two steps, each with its bound (BENCHMARKS.md's hostile section):

    1. `slot(size)`, admission: at most `limit + queued` uploads are in the
       server at once; one more is refused at once (503 with Retry-After),
       so a flood takes neither disk nor memory nor a reading process. An
       admitted upload's body is received as it arrives, as long as the
       bodies being held take at most `budget` bytes in all (by their
       Content-Length: the disk they may fill); one that does not fit waits
       before its body is read (holding only its connection).
    2. `turn(size)`: one of `limit` turns to be read (its own process) and
       predicted, taken once the body is in. In the first seconds of a
       turn, bodies of 4x its size or more wait (`yield_to_smaller`). A
       read that is slow while others want a turn gives its turn back and
       goes on in one of `slow_reads` places (`Turn.lower`); when they are
       all taken, it is stopped instead (503 with Retry-After).

    Why the body is received before the turn (measured: 2 uploads whose
    files are slow to read held 2 of the 4 turns for their 120 s, and ten
    100 MB uploads took the other two while their bodies arrived, so a
    normal study of 300 kB waited for a 100 MB body to arrive): a body
    that is arriving holds no turn, so a turn is held only for the seconds
    of reading and predicting, and a few MB study is received beside large
    bodies in milliseconds.

    Both waits go to the smallest upload first (by Content-Length; the
    same size in arrival order): a study of a few MB does not wait behind
    uploads of hundreds of MB, whoever sent them (by client address,
    everyone behind one proxy, or on this machine, would be one client). A
    large upload waits while smaller ones come, at most `wait` seconds per
    step."""

    def __init__(self, limit: int, queued: int = 16, wait: float = 300, budget: int | None = None,
                 slow_reads: int = 2):
        self.limit, self.queued, self.wait, self.slow_reads = limit, queued, wait, slow_reads
        self.budget = budget if budget is not None else limit << 30
        self.admitted = 0  # uploads in the server (admitted, not yet answered)
        self.held = 0      # bytes of the bodies admitted to be received (their Content-Length)
        self.busy = 0      # turns held
        self.slow = 0      # places of slow reads held (Turn.lower: from the turn given back to the next one)
        self._for_bytes: list[tuple[int, int]] = []  # (size, arrival) of each upload waiting to be received
        self._for_turn: list[tuple[int, int]] = []   # ... and waiting for a turn
        self._turns: dict[int, tuple[int, float]] = {}  # arrival -> (size, when its turn began)
        self._arrivals = itertools.count()
        self._lock = threading.Lock()

    @property
    def waiting(self) -> int:
        """Uploads waiting: for room for their body, or for a turn."""
        return len(self._for_bytes) + len(self._for_turn)

    async def _wait(self, queue: list, ticket: tuple[int, int], free) -> None:
        """Until `free()` and `ticket` is the smallest in `queue` (then its side is taken under the lock)."""
        with self._lock:
            queue.append(ticket)
        try:
            end = time.monotonic() + self.wait
            while True:
                with self._lock:
                    if ticket == min(queue) and free():
                        return
                if time.monotonic() > end:
                    raise ApiError(503, "no turn came for this upload in time: try again in a minute", retry_after=15)
                await asyncio.sleep(0.05)
        finally:
            with self._lock:
                queue.remove(ticket)

    @asynccontextmanager
    async def slot(self, size: int = 0):
        """Admission, then room for the body's `size` bytes (a body larger than the budget alone is let in
        when nothing else is held)."""
        with self._lock:
            if self.admitted >= self.limit + self.queued:
                raise ApiError(503, f"the server is taking {self.admitted} uploads: try again in a minute",
                               retry_after=15)
            self.admitted += 1
        try:
            ticket = (size, next(self._arrivals))

            def room() -> bool:
                if self.held + size <= self.budget or self.held == 0:
                    self.held += size
                    return True
                return False

            await self._wait(self._for_bytes, ticket, room)
            try:
                yield
            finally:
                with self._lock:
                    self.held -= size
        finally:
            with self._lock:
                self.admitted -= 1

    def _free_turn(self) -> bool:
        """Take a turn if one is free (under the lock)."""
        if self.busy < self.limit:
            self.busy += 1
            return True
        return False

    @asynccontextmanager
    async def turn(self, size: int = 0):
        """One of `limit` turns to read and predict an upload whose body is in (a Turn: the reader may give
        it back, the route takes it again before the models)."""
        ticket = (size, next(self._arrivals))
        await self._wait(self._for_turn, ticket, self._free_turn)
        turn = Turn(self, ticket, time.monotonic())
        with self._lock:
            self._turns[ticket[1]] = (size, turn.began)
        try:
            yield turn
        finally:
            turn.end()

    YIELD_SECONDS = 5.0  # the first seconds of a turn, during which larger bodies wait (a study: about 1 s)

    async def yield_to_smaller(self, size: int) -> None:
        """Before the next chunk of a body of `size` bytes is read: wait while an upload of a quarter of that
        or less is in the first YIELD_SECONDS of its turn (at most that long). Why (measured, BENCHMARKS.md):
        ten 100 MB bodies arriving at once took the CPU that a study of 300 kB needed to be read and
        predicted (its models took 4x their idle time); a body that is not read costs neither the server
        nor its sender any CPU (the sender waits on TCP), and a study's turn lasts about a second."""
        end = time.monotonic() + self.YIELD_SECONDS
        while True:
            now = time.monotonic()
            with self._lock:
                ahead = any(4 * small <= size and now - began < self.YIELD_SECONDS
                            for small, began in self._turns.values())
            if not ahead or now > end:
                return
            await asyncio.sleep(0.05)


class Turn:
    """One upload's turn (Slots.turn), which its reading process may give back while it is slow.

    Why (measured, BENCHMARKS.md "Session 10"): four uploads of files that
    take the whole `read_seconds` to read held all four turns, and a normal
    study (0.4 s) waited up to 120 s for one. Now a read still running after
    a second (web.reader.DEMOTE_AFTER; a study of a few hundred slices is
    read in well under one) while another upload wants a turn (one waits
    with none free, or a later one is being read) is lowered in priority
    and gives its turn back (`lower`): it goes on in one of the server's
    `slow_reads` places. When they are all taken, the read is stopped (its
    process killed) and the upload told to come back (503 with
    Retry-After): whoever sends more slow uploads than that gets the 503,
    not the user who sends a study. A legitimately large upload (thousands
    of slices) read while two slow ones hold those places is stopped too;
    it is not harmed otherwise. Reading processes at once are then at most
    `limit + slow_reads`.

    A lowered upload takes a turn again for its models (`again`: waits as
    any upload does, smallest first, the same ticket), so the models run
    for at most `limit` uploads at once, as before, and keeps its slow
    place until then: uploads read but not yet predicted, whose decoded
    images are held in the server, stay within the same bounds."""

    def __init__(self, slots: Slots, ticket: tuple[int, int], began: float):
        self.slots, self.ticket, self.began = slots, ticket, began
        self.held = True   # one of the turns
        self.slow = False  # one of the slow reads' places

    def wanted(self) -> bool:
        """Whether an upload waits for a turn and none is free."""
        s = self.slots
        with s._lock:
            return bool(s._for_turn) and s.busy >= s.limit

    def lower(self) -> bool:
        """Give the turn back for one of the slow reads' places; False (nothing changed) when those are taken."""
        s = self.slots
        with s._lock:
            if not self.held:
                return True
            if s.slow >= s.slow_reads:
                return False
            s.slow += 1
            s.busy -= 1
            self.slow, self.held = True, False
            s._turns.pop(self.ticket[1], None)
            return True

    async def again(self) -> None:
        """A turn again for the models, if the read gave its turn back (then its slow place is freed)."""
        if self.held:
            return
        s = self.slots
        await s._wait(s._for_turn, self.ticket, s._free_turn)
        with s._lock:
            self.held = True
            s.slow -= 1
            self.slow = False
            s._turns[self.ticket[1]] = (self.ticket[0], self.began)  # its first seconds are long past

    def end(self) -> None:
        """The upload is answered: its turn or its slow place is free."""
        s = self.slots
        with s._lock:
            if self.held:
                s.busy -= 1
                s._turns.pop(self.ticket[1], None)
            if self.slow:
                s.slow -= 1
            self.held = self.slow = False


@dataclass
class Server:
    settings: ServerSettings
    engine: WebEngine
    store: StudyStore
    reader: Reader
    work: WorkDir
    renders: Renders
    uploads: Slots


def server(request: Request) -> Server:
    return request.app.state.server


def stored_study(study_id: str, srv: Server = Depends(server)) -> StoredStudy:
    study = srv.store.get(study_id)
    if study is None:
        raise ApiError(404, GONE)
    return study


def series_param(series: int | None = Query(None, ge=0, description="a series' index; default the chosen one")):
    return series


def series_result(study: StoredStudy = Depends(stored_study), series: int | None = Depends(series_param)
                  ) -> StudyResult:
    result = study.result(series)
    if result is None:
        raise ApiError(404, f"series {series} of this study has no result (see the study's series list: "
                            "`has_result`, `reason`)")
    return result


def threshold_param(threshold: str | None = None) -> float:
    """A download's threshold: a number in (0, 1), both excluded; default 0.5; anything else a 400."""
    if threshold is None:
        return 0.5
    try:
        cut = float(threshold)
    except ValueError:
        cut = math.nan
    if not 0 < cut < 1:  # NaN too
        raise ApiError(400, f"the threshold must be a number between 0 and 1 (both excluded), got {threshold[:20]!r}")
    return cut
