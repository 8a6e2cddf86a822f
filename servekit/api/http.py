"""The HTTP/1.1 protocol the three ports speak: uvicorn's httptools protocol with read deadlines, disconnect
hooks, and a direct route that answers a request without going through ASGI. The answers it writes itself, and what
every answer carries (caching headers, request ids), are ``servekit.api.response``'s.

Deadlines: uvicorn has no deadline for reading a request, so a client that trickles its headers or body (slow
loris) holds a connection forever. Here a connection is closed when a request's head has not fully arrived within
``header_timeout`` seconds (counted from the connection's start or the request's first byte) or its body within
``body_timeout`` seconds after the head (checked by one sweep per port, ``Deadlines``). Idle keep-alive connections
keep uvicorn's own timeout.

Overload: every inference request's head is offered to the route's ``refuse`` before its body is read; a request the
model cannot queue is answered 503 there, and its connection rests if it comes straight back (``Pacing``, issue 13).
While a port refuses (a refusal in the last second), a request that arrives whole in one read, in the plain form
clients send (``whole_request``), is decided from its bytes before the parser sees it: refused, or run on the direct
route. Either skips the parser's callbacks, and a refusal's bytes are built once a second (``Refusal``): under a flood
the front end's time goes to the requests it serves.

Disconnect hooks: a request's scope carries its connection's hooks under ``DISCONNECT_HOOKS``, callables that run
when the client goes away, so that a queued request is dropped without a task watching ``receive()`` for it.

Oversized bodies: a request whose body is over the route's limit is answered 413 at once, and the rest of its body is
then read and discarded before the connection closes, because a client that sends its whole body before reading the
answer (Python's http.client, Java's HttpClient) meets a reset connection, not the 413, if the server closes while
the body still arrives. Discarding is bounded (``discarded_at_most`` the limit, and ``body_timeout``): past it, or
for a body declared larger, the connection closes at once. The same bound holds for a body that uvicorn discards
after an ASGI route answered 413 early (``read_body``), where the connection otherwise stays open.

Direct route: on the inference port, ``/predictions`` requests (``DirectRoute.matches``) are read here, body and
all, handed to the route as ``(scope, body)``, and its response is written with one ``write`` (``ResponseWriter``):
no ASGI receive/send messages, no second write for the head. The route's task is tracked like uvicorn's, so a
graceful shutdown waits for it. Requests the direct path does not take (pipelined behind another, ``Expect:
100-continue``, upgrades) go through ASGI as usual.
"""

from __future__ import annotations

import asyncio
import math
import re
from collections.abc import Callable
from typing import Any, Protocol

from starlette.responses import Response, StreamingResponse

from servekit.api.pacing import Deadlines, Pacing
from servekit.api.response import Exchange, Refusal, ResponseWriter

DISCONNECT_HOOKS = "servekit.disconnect_hooks"
Hooks = set[Callable[[], Any]]


# A request's head as ``whole_request`` takes it: POST or PUT, a path without escapes, HTTP/1.1, header lines of
# printable ASCII. Anything else is left to the parser, which answers it as before.
_HEAD = re.compile(
    rb"(POST|PUT) (/[^\x00-\x20#%?\x7f-\xff]*)(?:\?([^\x00-\x20#\x7f-\xff]*))? HTTP/1\.1\r\n"
    rb"((?:[-!#$%&'*+.^_`|~0-9A-Za-z]+:[\t\x20-\x7e]*\r\n)*)\r\n"
)
_FIELD = re.compile(rb"([^:]+):[\t ]*([\t\x20-\x7e]*?)[\t ]*\r\n")
_NOT_PLAIN = (b"transfer-encoding", b"expect", b"upgrade")
# method, path, query, headers, keep-alive, body
WholeRequest = tuple[str, str, bytes, list[tuple[bytes, bytes]], bool, bytes]


def whole_request(data: bytes) -> WholeRequest | None:
    """``data`` as one whole request (head and ``Content-Length`` body, nothing after it) in the plain form clients
    send, with its headers as uvicorn gives them (lower-case names, values without surrounding blanks); ``None``
    for anything else: a partial or pipelined request, a chunked body, ``Expect``, an upgrade, a ``Connection``
    other than keep-alive or close, escapes in the path, HTTP/1.0."""
    head = _HEAD.match(data)
    if head is None:
        return None
    method, path, query, block = head.groups()
    length = 0
    seen_length = False
    keep_alive = True
    headers = []
    for name, value in _FIELD.findall(block):
        name = name.lower()
        if name == b"content-length":
            if seen_length or not value.isdigit():
                return None
            seen_length, length = True, int(value)
        elif name == b"connection":
            token = value.lower()
            if token not in (b"close", b"keep-alive"):
                return None
            keep_alive = token == b"keep-alive"
        elif name in _NOT_PLAIN:
            return None
        headers.append((name, value))
    start = head.end()
    if start + length != len(data):
        return None
    return method.decode(), path.decode("latin-1"), query or b"", headers, keep_alive, data[start:]


def discarded_at_most(limit: int) -> int:
    """How many bytes of a body refused with 413 (over ``limit``) are read and discarded before the connection is
    closed anyway: a few times the limit, and at least 16 MiB."""
    return max(4 * limit, 16 << 20)


def disconnect_hooks(scope: dict[str, Any] | Any) -> Hooks | None:
    """The hooks of the connection a request came on (``None`` on a server without them)."""
    hooks: Hooks | None = scope.get(DISCONNECT_HOOKS)
    return hooks


class DirectRoute(Protocol):
    """What the protocol needs from a route it answers itself."""

    limit: int  # the largest body accepted; a larger one is answered by ``too_large``

    def matches(self, method: str, path: str) -> bool: ...

    async def __call__(self, scope: dict[str, Any], body: bytes) -> Response: ...

    def too_large(self, scope: dict[str, Any], size: int) -> Response: ...

    def refuse(self, scope: dict[str, Any]) -> Refusal | None:
        """An answer decided from the request's head alone (overload), or ``None`` to read the body and call."""


class HttpProtocol(ResponseWriter):
    header_timeout = 10.0
    body_timeout = 60.0
    discard_limit = discarded_at_most(6553500)  # see ``_too_large``
    direct: DirectRoute | None = None
    pacing: Pacing
    _wake: asyncio.TimerHandle | None = None
    _refused: tuple[float, float] | None = None  # the last refusal (loop time) and when the connection may rest until
    _held = b""  # what a resting connection sent, parsed when it wakes
    deadlines: Deadlines
    _deadline: float | None = None  # loop time by which the request's head or body must have arrived
    _hooks: Hooks
    _exchange: Exchange | None = None
    _between = True  # the parser is between requests: ``_take`` may take the next one whole
    _admitted = False  # ``_take`` offered this request to ``refuse``, which let it through (and promised it a place)
    _discarded = 0  # bytes of a body dropped after its answer went out through ASGI (a 413 from ``read_body``)

    def _arm(self, seconds: float) -> None:
        self._deadline = self.loop.time() + seconds

    def _disarm(self) -> None:
        self._deadline = None

    def expire(self, now: float) -> None:
        """Close the connection if its read deadline has passed (``Deadlines`` calls this)."""
        if self._deadline is not None and now >= self._deadline and not self.transport.is_closing():
            self._deadline = None
            self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._hooks = set()
        self._arm(self.header_timeout)
        self.deadlines.watch(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.deadlines.forget(self)
        self._end_rest()
        for hook in list(self._hooks):
            hook()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        self._between = False
        super().on_message_begin()
        self.scope[DISCONNECT_HOOKS] = self._hooks  # type: ignore[literal-required]
        if self._deadline is None:
            self._arm(self.header_timeout)

    def on_headers_complete(self) -> None:
        self._arm(self.body_timeout)
        if self.direct is None or self.expect_100_continue or self.parser.should_upgrade():
            super().on_headers_complete()
            return
        method = self.parser.get_method().decode("ascii")
        path = self.url.partition(b"?")[0].decode("latin-1")
        busy = self.cycle is not None and not self.cycle.response_complete
        if busy or "%" in path:
            super().on_headers_complete()
            return
        http_version = self.parser.get_http_version()
        scope: dict[str, Any] = self.scope  # type: ignore[assignment]
        scope.update(method=method, path=path, raw_path=path.encode("latin-1"), http_version=http_version)
        scope["query_string"] = self.url.partition(b"?")[2]
        admitted, self._admitted = self._admitted, False
        refusal = None if admitted else self.direct.refuse(scope)  # any inference route
        if refusal is None and not self.direct.matches(method, path):
            super().on_headers_complete()
            return
        keep_alive = http_version != "1.0" and self.parser.should_keep_alive()
        if refusal is not None:  # the body that follows is skipped (``on_body``)
            self._exchange = self._refuse(refusal, keep_alive)
            return
        self._exchange = exchange = Exchange(keep_alive)
        self.cycle = exchange  # type: ignore[assignment]
        declared = next((v for k, v in self.headers if k == b"content-length"), b"")
        if declared.isdigit() and int(declared) > self.direct.limit:
            self._too_large(exchange, self.direct, int(declared))

    def _refuse(self, refusal: Refusal, keep_alive: bool) -> Exchange:
        """Answer a request refused from its head, with a ``Retry-After`` of how long its connection rests if it
        comes straight back (``Pacing``); its body, if any, is skipped."""
        exchange = Exchange(keep_alive)
        exchange.response_complete = True
        self.cycle = exchange  # type: ignore[assignment]
        if not self.transport.is_closing():
            refused_at, wake = self._refused = self.pacing.refused(self.loop)
            retry_after = max(1, math.ceil(wake - refused_at))
            self.transport.write(refusal.answer(self.server_state.default_headers, retry_after, keep_alive))
            self._finish(exchange)
        return exchange

    def data_received(self, data: bytes) -> None:
        if self._refused is not None:
            (refused_at, wake), self._refused = self._refused, None
            if self.pacing.straight_back(refused_at, self.loop.time()):  # it rests (``Pacing``)
                self._held = data
                self._rest(wake)
                return
        self._receive(data)

    def _receive(self, data: bytes) -> None:
        if not (self._between and self.direct is not None and self.pacing.refusing(self.loop) and self._take(data)):
            super().data_received(data)

    def _take(self, data: bytes) -> bool:
        """While the port refuses: if ``data`` is one whole plain request (``whole_request``), decide it from its
        bytes without the parser. Refused, it is answered as ``on_headers_complete`` would; admitted on the direct
        route, it runs as ``on_message_complete`` would start it. ``False`` leaves ``data`` to the parser."""
        if self.cycle is not None and not self.cycle.response_complete:
            return False
        request = whole_request(data)
        if request is None:
            return False
        method, path, query, headers, keep_alive, body = request
        scope: dict[str, Any] = {
            "method": method,
            "path": path,
            "query_string": query,
            "headers": headers,
            "client": self.client,
        }
        route = self.direct
        assert route is not None
        refusal = route.refuse(scope)
        if refusal is None and not (route.matches(method, path) and len(body) <= route.limit):
            self._admitted = True  # the parser reads it, and ``on_headers_complete`` does not ask again
            return False
        self._unset_keepalive_if_required()
        self._disarm()
        if refusal is not None:
            self._refuse(refusal, keep_alive)
            return True
        scope.update(  # the rest of uvicorn's scope (``on_message_begin``) and ours
            type="http",
            asgi={"version": self.asgi_version, "spec_version": "2.3"},
            http_version="1.1",
            server=self.server,
            scheme=self.scheme,
            root_path=self.root_path,
            state=self.app_state.copy(),
            raw_path=path.encode("latin-1"),
        )
        scope[DISCONNECT_HOOKS] = self._hooks
        exchange = Exchange(keep_alive)
        self.cycle = exchange  # type: ignore[assignment]
        self._serve(exchange, route, scope, body)
        return True

    def _rest(self, wake: float) -> None:
        """Read nothing more from this connection until ``wake`` (loop time)."""
        if self.transport.is_closing() or self._wake is not None:
            return
        self.pacing.resting += 1
        self.flow.pause_reading()
        self._wake = self.loop.call_at(wake, self._end_rest)

    def _end_rest(self) -> None:
        if self._wake is not None:
            self._wake.cancel()
            self._wake = None
            self.pacing.resting -= 1
            if not self.transport.is_closing():
                self.flow.resume_reading()
                held, self._held = self._held, b""
                if held:
                    self._receive(held)

    def on_body(self, body: bytes) -> None:
        exchange = self._exchange
        if exchange is None:
            if self.cycle is not None and self.cycle.response_complete:  # answered early (a 413): dropped, bounded
                self._discarded += len(body)
                if self._discarded > self.discard_limit:
                    self.transport.close()
            super().on_body(body)
            return
        if exchange.response_complete or self.direct is None:
            if exchange.discarding:
                exchange.size += len(body)
                if exchange.size > self.discard_limit:
                    self.transport.close()
            return
        exchange.size += len(body)
        if exchange.size > self.direct.limit:
            self._too_large(exchange, self.direct, exchange.size)
            return
        exchange.chunks.append(body)

    def on_message_complete(self) -> None:
        self._between = True
        self._disarm()
        exchange, self._exchange = self._exchange, None
        if exchange is None:
            self._discarded = 0
            super().on_message_complete()
            return
        if exchange.response_complete or self.direct is None:
            if exchange.discarding:  # the whole body is in: the client now reads the 413
                self._finish(exchange)
            elif self.timeout_keep_alive_task is None and not self.transport.is_closing():
                # answered from its head (a refusal) and the rest of its body came later, which disarmed the idle
                # timeout that the answer armed: the connection is idle from now on, as after any response
                self.timeout_keep_alive_task = self.loop.call_later(
                    self.timeout_keep_alive, self.timeout_keep_alive_handler
                )
            return
        body = exchange.chunks[0] if len(exchange.chunks) == 1 else b"".join(exchange.chunks)
        exchange.chunks = []
        self._serve(exchange, self.direct, self.scope, body)  # type: ignore[arg-type]

    def _serve(self, exchange: Exchange, route: DirectRoute, scope: dict[str, Any], body: bytes) -> None:
        """Run a whole request on the direct route, as a task that a graceful shutdown waits for (as uvicorn's)."""
        task = self.loop.create_task(self._run(exchange, route, scope, body))
        task.add_done_callback(self.tasks.discard)
        self.tasks.add(task)

    async def _run(self, exchange: Exchange, route: DirectRoute, scope: dict[str, Any], body: bytes) -> None:
        if exchange.disconnected:  # the client left right after sending (e.g. while its connection rested)
            return
        response = await route(scope, body)
        if isinstance(response, StreamingResponse):
            await self._stream(exchange, response)
            return
        self._answer(exchange, response)
        if response.status_code == 503 and "retry-after" in response.headers:  # refused after its body was read
            self._refused = self.pacing.refused(self.loop)

    def _too_large(self, exchange: Exchange, route: DirectRoute, size: int) -> None:
        """Answer 413 now; the connection closes once the rest of the body is read and dropped (``on_body``,
        ``on_message_complete``), or at once if the body is declared larger than we would read."""
        response = route.too_large(self.scope, size)  # type: ignore[arg-type]
        exchange.response_complete = True
        exchange.keep_alive = False
        if not self._write_head(exchange, response.status_code, response.raw_headers, response.body, checked=True):
            return
        if size > self.discard_limit:
            self._finish(exchange)
        else:
            exchange.discarding = True


def protocol_with(header_timeout: float, body_timeout: float, direct: DirectRoute | None = None) -> type[HttpProtocol]:
    """An ``HttpProtocol`` with these deadlines and direct route, for ``uvicorn.Config(http=...)``."""
    attributes = {
        "header_timeout": header_timeout,
        "body_timeout": body_timeout,
        "discard_limit": discarded_at_most(direct.limit) if direct is not None else HttpProtocol.discard_limit,
        "direct": direct,
        "pacing": Pacing(),
        "deadlines": Deadlines(min(1.0, header_timeout / 5, body_timeout / 5)),
    }
    return type("ServekitHttpProtocol", (HttpProtocol,), attributes)
