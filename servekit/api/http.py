"""The HTTP/1.1 protocol the three ports speak: uvicorn's httptools protocol with read deadlines.

uvicorn has no deadline for reading a request, so a client that trickles its headers or body (slow loris) holds
a connection forever. Here a connection is closed when a request's head has not fully arrived within
``header_timeout`` seconds (counted from the connection's start or the request's first byte) or its body within
``body_timeout`` seconds after the head. Idle keep-alive connections keep uvicorn's own timeout.
"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class DeadlineProtocol(HttpToolsProtocol):
    header_timeout = 10.0
    body_timeout = 60.0
    _deadline: asyncio.TimerHandle | None = None

    def _arm(self, seconds: float) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(seconds, self._expired)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        if not self.transport.is_closing():
            self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm(self.header_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._deadline is None:
            self._arm(self.header_timeout)

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        self._arm(self.body_timeout)

    def on_message_complete(self) -> None:
        self._disarm()
        super().on_message_complete()


def protocol_with(header_timeout: float, body_timeout: float) -> type[DeadlineProtocol]:
    """A ``DeadlineProtocol`` with these deadlines, for ``uvicorn.Config(http=...)``."""
    return type(
        "ServekitHttpProtocol", (DeadlineProtocol,), {"header_timeout": header_timeout, "body_timeout": body_timeout}
    )
