"""How the HTTP protocol (``servekit.api.http``) writes the answers it gives itself: the direct route's, its refusals
and 413s, and uvicorn's 400 for bytes that are not HTTP; and what every answer carries.

Writing: an answer's status line, headers and body go out in one ``write``; a streamed answer goes chunk by chunk in
chunked transfer encoding, and an error mid-stream closes the connection without the last chunk. Headers that a
handler set, and its reason phrase (TorchServe puts it in the status line), are checked for what HTTP forbids in
them: an answer with one that is not valid HTTP is replaced by a 500.

Caching: every answer carries TorchServe's ``NO_CACHE`` headers (``sendHttpResponse`` sets them on each), given to
uvicorn as default headers (``servekit.server``), so that the direct route's answers and uvicorn's own have them too.

Request ids: ``new_request_id`` names each request (``x-request-id`` on every response, as TorchServe sends).
"""

from __future__ import annotations

import itertools
import logging
import uuid
from collections.abc import Iterable

from starlette.responses import Response, StreamingResponse
from uvicorn.protocols.http.httptools_impl import HEADER_RE, HEADER_VALUE_RE, STATUS_LINE, HttpToolsProtocol

logger = logging.getLogger("servekit.http")  # the protocol's logger (``servekit.api.http``)

# TorchServe's caching headers, on every answer, replacing any of them a handler sets (servekit.api.dispatch)
NO_CACHE = {
    "pragma": "no-cache",
    "cache-control": "no-cache; no-store, must-revalidate, private",
    "expires": "Thu, 01 Jan 1970 00:00:00 UTC",
}


_RANDOM = uuid.uuid4().hex[:20]  # random per process; a counter makes each id unique at no system call
_ID_PREFIX = f"{_RANDOM[:8]}-{_RANDOM[8:12]}-{_RANDOM[12:16]}-{_RANDOM[16:]}-"
_ID_BYTES = _ID_PREFIX.encode()
_id_counter = itertools.count()


def new_request_id() -> str:
    """A request id in UUID form (as TorchServe's): a per-process random prefix and a counter."""
    return f"{_ID_PREFIX}{next(_id_counter):012x}"


CLOSE = b"connection: close\r\n"  # after the other headers of an answer whose connection then closes


def header_lines(headers: Iterable[tuple[bytes, bytes]]) -> bytes:
    """Headers as written in an answer's head: ``name: value`` and CRLF each."""
    parts: list[bytes] = []
    for name, value in headers:  # appending the pieces: a microbenchmark found it faster than formatting each line
        parts += [name, b": ", value, b"\r\n"]
    return b"".join(parts)


class Refusal:
    """A 503 decided from a request's head (``servekit.api.http``): its status, its own headers and its body. Each
    answer adds ``retry-after`` (how long the connection rests, ``Pacing``) and ``x-request-id``. Under a flood there
    are thousands a second, so the bytes up to those two headers are built once for each list of the server's
    default headers (uvicorn renews it, with its ``date``, once a second)."""

    __slots__ = ("_defaults", "_head", "body", "headers", "status")

    def __init__(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body
        self._defaults: list[tuple[bytes, bytes]] | None = None
        self._head = b""

    def answer(self, defaults: list[tuple[bytes, bytes]], retry_after: int, keep_alive: bool) -> bytes:
        """The whole answer, as ``ResponseWriter._write_head`` writes one: status line, ``defaults``, its headers,
        then ``retry-after``, ``x-request-id`` and, unless ``keep_alive``, ``connection: close``."""
        if defaults is not self._defaults:
            self._head = STATUS_LINE[self.status] + header_lines([*defaults, *self.headers])
            self._defaults = defaults
        tail = b"\r\n" if keep_alive else CLOSE + b"\r\n"
        own = b"retry-after: %d\r\nx-request-id: %s%012x\r\n" % (retry_after, _ID_BYTES, next(_id_counter))
        return b"".join((self._head, own, tail, self.body))


class Exchange:
    """One request on the direct route; stands where uvicorn keeps its request/response cycle, with the
    attributes the base protocol reads and sets (``response_complete``, ``disconnected``, ``keep_alive``,
    ``message_event``)."""

    __slots__ = ("chunks", "discarding", "disconnected", "keep_alive", "message_event", "response_complete", "size")

    def __init__(self, keep_alive: bool) -> None:
        self.response_complete = False
        self.discarding = False  # answered 413: the rest of the body is read and dropped, then the connection closed
        self.disconnected = False
        self.keep_alive = keep_alive
        self.chunks: list[bytes] = []
        self.size = 0
        self.message_event = self  # the base protocol calls message_event.set() on disconnect

    def set(self) -> None:
        pass


class ResponseWriter(HttpToolsProtocol):
    """uvicorn's httptools protocol with the writing of the answers that ``HttpProtocol`` (``servekit.api.http``) gives
    itself, on the connection's transport."""

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to bytes that are not HTTP, with an ``x-request-id`` as every answer has."""
        body = msg.encode("ascii")
        headers = [
            *self.server_state.default_headers,
            (b"content-type", b"text/plain; charset=utf-8"),
            (b"content-length", b"%d" % len(body)),
            (b"connection", b"close"),
            (b"x-request-id", new_request_id().encode()),
        ]
        self.transport.write(b"".join([STATUS_LINE[400], header_lines(headers), b"\r\n", body]))
        self.transport.close()

    async def _stream(self, exchange: Exchange, response: StreamingResponse) -> None:
        """A streamed response, chunk by chunk (chunked transfer encoding). An error mid-stream closes the
        connection without the last chunk, so the client sees the response was cut short."""
        headers = [(k, v) for k, v in response.raw_headers if k != b"content-length"]
        chunked = [*headers, (b"transfer-encoding", b"chunked")]
        chunks = aiter(response.body_iterator)
        try:
            first = _chunk(await anext(chunks, b""))  # at hand (``servekit.api.dispatch``): one write with the head
            if not self._write_head(exchange, response.status_code, chunked, first, reason=reason_of(response)):
                return
            async for chunk in chunks:
                if self.transport.is_closing():
                    return  # the client went away: the rest of the stream is dropped
                if data := _chunk(chunk):
                    self.transport.write(data)
                    if self.flow.write_paused:
                        await self.flow.drain()
        except Exception as exc:
            logger.warning("a streamed response was cut short: %s", exc)
            self.transport.close()
            return
        finally:
            exchange.response_complete = True
        self._finish(exchange, b"0\r\n\r\n")

    def _answer(self, exchange: Exchange, response: Response) -> None:
        """Write the whole response at once, then let the next request in (as uvicorn does after a response)."""
        exchange.response_complete = True
        reason = reason_of(response)
        if self._write_head(exchange, response.status_code, response.raw_headers, response.body, reason=reason):
            self._finish(exchange)

    def _write_head(
        self,
        exchange: Exchange,
        status: int,
        headers: list[tuple[bytes, bytes]],
        body: bytes | memoryview = b"",
        checked: bool = False,
        reason: str | None = None,
    ) -> bool:
        """Write the status line and headers (and ``body``, in the same write); ``False`` if the client is gone.
        Headers are checked for what HTTP forbids in them unless ``checked`` (headers of our own)."""
        if exchange.disconnected or self.transport.is_closing():
            return False
        if not checked and any(HEADER_RE.search(name) or HEADER_VALUE_RE.search(value) for name, value in headers):
            logger.error("a response header is not valid HTTP; answering 500 instead")
            status, headers, body, exchange.keep_alive = 500, [(b"content-length", b"0")], b"", False
        line = STATUS_LINE[status]
        if reason is not None:  # a handler's phrase (TorchServe sends it, or none), checked as a header value
            phrase = reason.encode("latin-1", "replace")
            if HEADER_VALUE_RE.search(phrase):
                logger.error("a handler's reason phrase is not valid HTTP; answering 500 instead")
                status, headers, body, exchange.keep_alive = 500, [(b"content-length", b"0")], b"", False
                line = STATUS_LINE[500]
            else:
                line = b"HTTP/1.1 %d %s\r\n" % (status, phrase)
        lines = header_lines([*self.server_state.default_headers, *headers])  # the server's own are valid HTTP
        close = b"" if exchange.keep_alive else CLOSE
        self.transport.write(b"".join((line, lines, close, b"\r\n", body)))
        return True

    def _finish(self, exchange: Exchange, tail: bytes = b"") -> None:
        if self.transport.is_closing():
            return
        if tail:
            self.transport.write(tail)
        if not exchange.keep_alive:
            self.transport.close()
        self.on_response_complete()


def _chunk(chunk: bytes | str | memoryview) -> bytes:
    """One chunk of a chunked body, framed; ``b""`` for an empty one (it would end the body)."""
    data = chunk.encode() if isinstance(chunk, str) else bytes(chunk)
    return b"%x\r\n%b\r\n" % (len(data), data) if data else b""


def reason_of(response: Response) -> str | None:
    """The reason phrase a handler's answer carries (``reason_phrase``: ``servekit.api.dispatch``), else ``None``."""
    return getattr(response, "reason_phrase", None)
