"""A time limit on a request's head, put around uvicorn's own HTTP protocol by composition.

uvicorn closes an idle keep-alive connection after `timeout_keep_alive`
seconds, but a connection whose request head stops half-way (or that never
sends one) is held for good: a few hundred of those exhaust the server's
file descriptors (slowloris). Here every connection carries one request
(web.guard answers each with `Connection: close`), and a connection whose
head, up to its blank line, has not arrived `header_timeout` seconds after
it opened is closed. The body's time limits are the app's
(web.uploads.receive_files within `upload_seconds`); h11 caps a head at
`h11_max_incomplete_event_size` bytes (serve.py sets 64 kB).

Why a wrapper and not a subclass: it uses only uvicorn's public `Config`
and `Server` and the asyncio Protocol interface, so it does not depend on
the inside of uvicorn's protocol class, which may change in any release.
"""
from __future__ import annotations

import asyncio
import re

HEAD_END = re.compile(rb"\n\r?\n")  # where h11 ends a request head (it accepts bare LF line ends too)


class HeadDeadline(asyncio.Protocol):
    """asyncio calls reach `inner` (uvicorn's protocol) unchanged; a connection without a complete request
    head `seconds` after it opened is closed."""

    def __init__(self, inner: asyncio.Protocol, seconds: float):
        self.inner, self.seconds = inner, seconds
        self.timer: asyncio.TimerHandle | None = None
        self.tail = b""
        self.transport = None

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.timer = asyncio.get_running_loop().call_later(self.seconds, self._late)
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self.timer is not None:
            seen = self.tail + data
            if HEAD_END.search(seen):
                self._disarm()
            else:
                self.tail = seen[-2:]
        self.inner.data_received(data)

    def eof_received(self):
        return self.inner.eof_received()

    def connection_lost(self, exc) -> None:
        self._disarm()
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    def _disarm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _late(self) -> None:
        self.timer = None
        if not self.transport.is_closing():
            self.transport.close()  # no response: the client never finished asking


def serve(app, *, header_timeout: float, **options) -> None:
    """uvicorn.run(app, **options), each connection under HeadDeadline; options are uvicorn.Config's."""
    import uvicorn

    config = uvicorn.Config(app, http="h11", **options)
    config.load()
    inner = config.http_protocol_class
    config.http_protocol_class = lambda **kw: HeadDeadline(inner(**kw), header_timeout)
    uvicorn.Server(config).run()
