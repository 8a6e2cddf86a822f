"""Per-response bookkeeping on every port: TorchServe's ``Requests2XX/4XX/5XX`` counters and an access log line
in TorchServe's layout (``/<ip>:<port> "<METHOD> <path> HTTP/1.1" <status> <ms>``) on the ``servekit.access``
logger."""

from __future__ import annotations

import logging
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from servekit.metrics import Metrics

logger = logging.getLogger("servekit.access")


class AccessLog:
    """ASGI middleware: count and (if ``log``) log every HTTP response."""

    def __init__(self, app: ASGIApp, metrics: Metrics, log: bool) -> None:
        self.app = app
        self.metrics = metrics
        self.log = log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            self.done(scope, status, start)

    def done(self, scope: Scope, status: int, start: float) -> None:
        """Count a response and log it; for a route that answers ahead of this middleware."""
        self.metrics.response(status)
        if self.log:
            client = scope.get("client") or ("-", 0)
            elapsed_ms = (time.perf_counter() - start) * 1000
            logger.info(
                '/%s:%s "%s %s HTTP/%s" %d %.2fms',
                client[0],
                client[1],
                scope["method"],
                scope["path"],
                scope.get("http_version", "1.1"),
                status,
                elapsed_ms,
            )
