"""The server's HTTP layer under uvicorn: a deadline for a request's headers (uvicorn times idle keep-alive
connections, not a client that connects and trickles a header line), and a SIGTERM drain that ends with 0."""

from __future__ import annotations

import signal

from uvicorn.protocols.http.h11_impl import H11Protocol

DEFAULT_HEADER_TIMEOUT_S = 10.0


class HeaderDeadline(H11Protocol):
    """uvicorn's h11 protocol, closing a connection whose request headers are not in within `timeout_s` of it
    opening (a slowloris holds a connection, bounded by --limit-concurrency, only this long)."""

    timeout_s = DEFAULT_HEADER_TIMEOUT_S

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_timer = self.loop.call_later(self.timeout_s, self._headers_overdue)

    def _headers_overdue(self) -> None:
        if self.cycle is None and not self.transport.is_closing():  # no request has begun on it
            self.transport.close()

    def connection_lost(self, exc) -> None:
        self._header_timer.cancel()
        super().connection_lost(exc)


def run_draining(app, options: dict) -> None:
    """uvicorn's server until SIGTERM or SIGINT, then a drain of at most --drain-timeout, ending with 0 (uvicorn
    re-raises the signal after its drain, so the process would end as killed by it: -15 to its supervisor)."""
    import uvicorn

    class Draining(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            super().handle_exit(sig, frame)
            if sig == signal.SIGTERM:
                self._captured_signals.remove(sig)

    Draining(uvicorn.Config(app, **options)).run()
