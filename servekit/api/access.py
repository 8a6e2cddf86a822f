"""Per-response bookkeeping on every port: TorchServe's ``Requests2XX/4XX/5XX`` counters, an access log line in
TorchServe's layout (``/<ip>:<port> "<METHOD> <path> HTTP/1.1" <status> <ms>``) on the ``servekit.access`` logger,
and an ``x-request-id`` on every response that has none yet (TorchServe sends one on every answer)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from servekit import logs
from servekit.api.response import new_request_id
from servekit.metrics import Metrics

logger = logging.getLogger("servekit.access")


class AccessLog:
    """ASGI middleware: count and (if ``log``) log every HTTP response, and give it an ``x-request-id``."""

    def __init__(self, app: ASGIApp, metrics: Metrics, log: bool) -> None:
        self.app = app
        self.metrics = metrics
        self.log = log
        self._write: Callable[[str], None] | None = None

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
                headers = message.get("headers", [])
                if not any(name == b"x-request-id" for name, _ in headers):
                    message = {**message, "headers": [*headers, (b"x-request-id", new_request_id().encode())]}
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            self.done(scope, status, start)

    def done(self, scope: Scope, status: int, start: float) -> None:
        """Count a response and log it; for a route that answers ahead of this middleware."""
        self.metrics.response(status)
        if not self.log:
            return
        if self._write is None:  # resolved at the first line: logging is set up after the apps are built
            self._write = logs.info_writer(logger) or logger.info
        client = scope.get("client") or ("-", 0)
        elapsed_ms = (time.perf_counter() - start) * 1000
        method, path, version = scope["method"], scope["path"], scope.get("http_version", "1.1")
        self._write(f'/{client[0]}:{client[1]} "{method} {path} HTTP/{version}" {status} {elapsed_ms:.2f}ms')
