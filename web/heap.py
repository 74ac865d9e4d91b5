"""The server process's C heap: one arena for every thread, and freed memory handed back to the system.

Why (measured, BENCHMARKS.md's hostile section, session 10): glibc gives
each thread that allocates its own arena (up to 8 per core). The server
answers on many threads (FastAPI runs sync dependencies and drawings on
its thread pool; a flood of 8 to 40 clients brings up to 40 threads), so a
flood left freed blocks spread over a dozen arenas, where `malloc_trim`
could not return them: the process kept 40 to 90 MB more after each flood
whose results were deleted, and 143 MB over a run of every hostile case
(glibc's free bytes 21 -> 287 MB, live bytes unchanged). With one arena,
the same cases kept 2 to 6 MB, and the peaks were lower (freed blocks are
reused by the next thread instead of a new arena growing). The threads
that allocate much take turns anyway (the models on their own threads,
web.engine; drawings `max_renders` at a time), so they seldom wait for
each other on the arena's lock; the upload's time was measured the same
(`benchmarks/study.py --malloc`).
"""
from __future__ import annotations

import ctypes
import functools

M_MMAP_THRESHOLD, M_ARENA_MAX = -3, -8  # mallopt's parameter numbers (malloc.h)


@functools.cache
def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (musl, macOS): its own allocator, nothing to set
        return None


def set_option(param: int, value: int) -> bool:
    """glibc's mallopt(param, value); -> whether it was set (False where the C library is not glibc)."""
    libc = _libc()
    try:
        return bool(libc and libc.mallopt(param, value))
    except AttributeError:
        return False


def one_arena() -> bool:
    """Every thread allocates from the one main arena from now on (threads that already have an arena keep
    it: call this before the server starts its threads); -> whether it was set (glibc only)."""
    return set_option(M_ARENA_MAX, 1)


def give_back() -> None:
    """Return freed memory to the system: glibc keeps the heap of a dropped result for reuse, so the
    server's RSS would stay at its peak after the results that made it are gone."""
    libc = _libc()
    try:
        if libc:
            libc.malloc_trim(0)
    except AttributeError:  # not glibc
        pass
