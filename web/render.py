"""Drawing the viewer's images (PNG), a bounded number at a time.

Why bounded: a PNG of a slice costs memory while it is drawn (the decoded
slice in HU and its encoding); many clients asking at once multiplied it
(BENCHMARKS.md's hostile table). `Renders` lets `max_renders` drawings run
at once; a request that waits longer than `render_wait` for its turn is told
to come back (503 with Retry-After), so waiting requests hold no thread and
no memory. The viewer's source files are at most pipeline.study.SOURCE_PIXELS
each, and are decoded with that cap.
"""
from __future__ import annotations

import asyncio
import threading
import time
from contextlib import asynccontextmanager

import cv2
import numpy as np
from fastapi.concurrency import run_in_threadpool

from ich.dicom import read_hu
from pipeline.study import SOURCE_PIXELS

from .errors import ApiError


def png(image: np.ndarray, level: int = 3) -> bytes:
    ok, data = cv2.imencode(".png", image, [cv2.IMWRITE_PNG_COMPRESSION, level])
    if not ok:
        raise ApiError(500, "could not encode the image")
    return data.tobytes()


def hu_image(data: bytes) -> np.ndarray:
    """One source DICOM file (bytes, read once by the study path) -> H x W x 3 uint8 (BGR) whose red and
    green bytes are HU + 32768 (high, low byte), at the file's own resolution (at most SOURCE_PIXELS).

    Why this and not windowed PNGs: the viewer's window/level then runs in the browser on every drag
    without a request, for any centre/width (bone's 2800 HU too), at source resolution; a slice step is
    one request of ~5 ms decoding here. The cached 8-bit windows (image.png) are the network's input
    size and clip to their own ranges; the viewer falls back to them when the files were not kept.
    """
    _, hu = read_hu(data, max_pixels=SOURCE_PIXELS)
    v = (np.rint(hu).astype(np.int32) + 32768).clip(0, 65535)
    return np.dstack([np.zeros_like(v, np.uint8), (v & 255).astype(np.uint8), (v >> 8).astype(np.uint8)])


def heat_map(cam: np.ndarray) -> np.ndarray:
    """CAM in [0, 1] -> BGRA: the jet colour map, opaque where the network looked, transparent elsewhere."""
    bgr = cv2.applyColorMap((cam * 255).astype(np.uint8), cv2.COLORMAP_JET)
    alpha = (np.clip(cam, 0, 1) * 255).astype(np.uint8)
    return np.dstack([bgr, alpha])


class Renders:
    """At most `limit` drawings at once; a turn not had within `wait` seconds is a 503.

    A counter polled every 20 ms rather than an asyncio.Semaphore: the latter belongs to one event loop,
    and the app may be driven by several (tests); a waiting request holds no thread either way."""

    def __init__(self, limit: int, wait: float):
        self.limit, self.wait = limit, wait
        self._busy = 0
        self._lock = threading.Lock()

    def _take(self) -> bool:
        with self._lock:
            if self._busy < self.limit:
                self._busy += 1
                return True
            return False

    @asynccontextmanager
    async def turn(self):
        end = time.monotonic() + self.wait
        while not self._take():
            if time.monotonic() > end:
                raise ApiError(503, f"the server is drawing {self.limit} images for others: try again in a moment",
                               retry_after=2)
            await asyncio.sleep(0.02)
        try:
            yield
        finally:
            with self._lock:
                self._busy -= 1

    async def run(self, fn, *args):
        """fn(*args) in a worker thread, in turn."""
        async with self.turn():
            return await run_in_threadpool(fn, *args)
