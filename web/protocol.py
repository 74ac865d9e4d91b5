"""uvicorn's h11 protocol with a header read timeout.

uvicorn closes an idle keep-alive connection after `timeout_keep_alive`
seconds, but a connection whose request headers stop half-way (or that
never sends any) is held for good: a few hundred of those exhaust the
server's file descriptors. Here a connection that has not delivered a
complete request head `header_timeout` seconds after it opened, or after its
previous response ended, is closed. The body's read timeout is the app's
(web.uploads.receive_files); h11 caps a request head at
`h11_max_incomplete_event_size` bytes (serve.py sets 64 kB).
"""
from __future__ import annotations

from uvicorn.protocols.http.h11_impl import H11Protocol


def timed_h11(header_timeout: float) -> type:
    class TimedH11Protocol(H11Protocol):
        def _arm_header_timer(self) -> None:
            self._disarm_header_timer()
            self._header_timer = self.loop.call_later(header_timeout, self._headers_late)

        def _disarm_header_timer(self) -> None:
            timer = getattr(self, "_header_timer", None)
            if timer is not None:
                timer.cancel()
                self._header_timer = None

        def _headers_late(self) -> None:
            self._header_timer = None
            waiting = self.cycle is None or self.cycle.response_complete
            if waiting and not self.transport.is_closing():
                self.transport.close()  # no response: the client never finished asking

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm_header_timer()

        def handle_events(self) -> None:
            super().handle_events()
            if self.cycle is not None and not self.cycle.response_complete:
                self._disarm_header_timer()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete):
                self._arm_header_timer()

        def connection_lost(self, exc) -> None:
            self._disarm_header_timer()
            super().connection_lost(exc)

    return TimedH11Protocol
