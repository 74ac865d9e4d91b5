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
    """At most `limit` uploads in flight and `queued` more waiting for a turn (up to `wait` seconds, before
    their body is read: a waiting upload holds only its connection); one more is refused at once (503 with
    Retry-After), so a flood takes neither disk nor memory nor a reading process.

    Turns go to the smallest waiting upload first (by its Content-Length; the same size in arrival order):
    a study of a few MB does not wait behind uploads of hundreds of MB, whoever sent them (by client
    address, everyone behind one proxy, or on this machine, would be one client). A large upload waits
    while smaller ones come, at most `wait` seconds."""

    def __init__(self, limit: int, queued: int = 16, wait: float = 300):
        self.limit, self.queued, self.wait = limit, queued, wait
        self.busy = 0
        self._waiting: list[tuple[int, int]] = []  # (size, arrival) of each upload waiting for a turn
        self._arrivals = itertools.count()
        self._lock = threading.Lock()

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @asynccontextmanager
    async def slot(self, size: int = 0):
        with self._lock:
            if self.busy >= self.limit and len(self._waiting) >= self.queued:
                raise ApiError(503, f"the server is taking {self.limit} uploads and {len(self._waiting)} more "
                                    "wait: try again in a minute", retry_after=15)
            ticket = (size, next(self._arrivals))
            self._waiting.append(ticket)
        try:
            end = time.monotonic() + self.wait
            while True:
                with self._lock:
                    if self.busy < self.limit and ticket == min(self._waiting):
                        self.busy += 1
                        break
                if time.monotonic() > end:
                    raise ApiError(503, "no turn came for this upload in time: try again in a minute", retry_after=15)
                await asyncio.sleep(0.05)
        finally:
            with self._lock:
                self._waiting.remove(ticket)
        try:
            yield
        finally:
            with self._lock:
                self.busy -= 1


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
