"""Reading an inference request and answering it: the path every inference route shares (TorchServe's
``/predictions``, the Open Inference Protocol, KServe v1). It works on the ASGI scope and ``receive`` directly,
so that ``/predictions`` needs no Starlette request object.

Form bodies are read as TorchServe (Netty) reads them, and their values reach the handler as bytes exactly as the client
encoded them: a url-encoded value is its percent-decoded bytes, a multipart part its raw bytes (issue 14).

A request may carry ``X-Servekit-Timeout-Ms``: if it is still queued after that many milliseconds it is answered
504 and never reaches a worker. A request whose client disconnects while it waits is dropped from the queue (the
connection's disconnect hooks, ``servekit.api.http``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import TYPE_CHECKING
from urllib.parse import unquote_to_bytes

from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope

from servekit.api.errors import error_response
from servekit.api.http import Hooks, disconnect_hooks
from servekit.api.response import NO_CACHE, new_request_id
from servekit.errors import BadRequestError, ClientDisconnectedError, RequestTooLargeError, ServekitError
from servekit.model import Model
from servekit.protocol import Field
from servekit.protocol import Request as WorkerRequest
from servekit.protocol import Response as WorkerResponse

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks

logger = logging.getLogger("servekit.inference")
MAX_FORM_ITEMS = 1000  # fields, and files, in one form
TIMEOUT_HEADER = "x-servekit-timeout-ms"
FRAMING_HEADERS = frozenset({"content-length", "transfer-encoding", "connection"})  # the server's, not a handler's
PREDICTION_HEADERS: Mapping[str, str] = {
    "url_path": "",
    "explain": "False",
}  # what TorchServe adds to a /predictions request's headers


def header_map(scope: Scope) -> dict[str, str]:
    """The request's headers by lower-case name (the last of repeated ones), as a handler sees them."""
    return {name.decode("latin-1"): value.decode("latin-1") for name, value in scope["headers"]}


def header(scope: Scope, name: bytes) -> str | None:
    """One request header by lower-case name (the first if repeated), without building the whole map."""
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None


def request_timeout(headers: Mapping[str, str]) -> float | None:
    """The client's queueing budget in seconds (``X-Servekit-Timeout-Ms``), or ``None``."""
    value = headers.get(TIMEOUT_HEADER)
    if value is None:
        return None
    try:
        timeout_ms = float(value)
    except ValueError:
        raise BadRequestError(f"{TIMEOUT_HEADER} must be a number of milliseconds, got {value!r}") from None
    if not 0 < timeout_ms < 1e9:
        raise BadRequestError(f"{TIMEOUT_HEADER} must be positive, got {value!r}")
    return timeout_ms / 1000


async def read_body(receive: Receive, headers: Mapping[str, str], limit: int) -> bytes:
    """The whole body, refused with 413 as soon as it is known to exceed ``limit`` bytes."""
    declared = headers.get("content-length")
    if declared is not None and declared.isascii() and declared.isdigit() and int(declared) > limit:
        raise RequestTooLargeError(int(declared), limit)
    chunks = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnectedError("The client disconnected while sending the request")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise RequestTooLargeError(size, limit)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def read_fields(headers: Mapping[str, str], body: bytes) -> tuple[Field, ...]:
    """The request's inputs as TorchServe passes them: form fields by name (the last of repeated names wins), or the
    raw ``body`` with its MIME type."""
    content_type = headers.get("content-type")
    if not content_type:
        return (Field("body", None, body),)
    mime = content_type.split(";", 1)[0].strip().lower()
    if mime == "application/x-www-form-urlencoded":
        return urlencoded_fields(body)
    if mime == "multipart/form-data":
        return multipart_fields(content_type, body)
    return (Field("body", mime, body),)


def urlencoded_fields(body: bytes) -> tuple[Field, ...]:
    """Fields split at ``&``; each value the percent-decoded bytes (``+`` a space), with no content type; each name
    UTF-8 text; a name without ``=`` has an empty value. Malformed escapes pass as they are."""
    pairs = body.split(b"&")
    if len(pairs) > MAX_FORM_ITEMS and sum(1 for pair in pairs if pair) > MAX_FORM_ITEMS:
        raise BadRequestError(f"Malformed form body: more than {MAX_FORM_ITEMS} fields")
    fields: dict[str, Field] = {}
    for pair in pairs:
        if pair:
            raw_name, _, raw_value = pair.partition(b"=")
            name = _unquote(raw_name).decode("utf-8", "replace")
            fields[name] = Field(name, None, _unquote(raw_value))
    return tuple(fields.values())


def _unquote(raw: bytes) -> bytes:
    if b"+" in raw:
        raw = raw.replace(b"+", b" ")
    return unquote_to_bytes(raw) if b"%" in raw else raw


def multipart_fields(content_type: str, body: bytes) -> tuple[Field, ...]:
    """Each part's bytes as sent. A part with a ``filename`` carries its content type without parameters
    (``application/octet-stream`` if it names none); any other part carries none, whatever its headers say."""
    boundary = parse_options_header(content_type)[1].get(b"boundary")
    if not boundary:
        raise BadRequestError("Malformed form body: the multipart content type names no boundary")
    fields: dict[str, Field] = {}
    counts = {False: 0, True: 0}  # fields and files
    part: dict[bytes, bytes] = {}  # the current part's headers, by lower-case name
    header_name, header_value = bytearray(), bytearray()
    data: list[bytes] = []

    def on_part_begin() -> None:
        part.clear()
        data.clear()

    def on_header_field(chunk: bytes, start: int, end: int) -> None:
        header_name.extend(chunk[start:end])

    def on_header_value(chunk: bytes, start: int, end: int) -> None:
        header_value.extend(chunk[start:end])

    def on_header_end() -> None:
        part[bytes(header_name).lower()] = bytes(header_value)
        header_name.clear()
        header_value.clear()

    def on_part_data(chunk: bytes, start: int, end: int) -> None:
        data.append(chunk[start:end])

    def on_part_end() -> None:
        options = parse_options_header(part.get(b"content-disposition", b""))[1]
        if b"name" not in options:
            raise BadRequestError("Malformed form body: a part's Content-Disposition names no field")
        name = options[b"name"].decode("utf-8", "replace")
        is_file = b"filename" in options
        counts[is_file] += 1
        if counts[is_file] > MAX_FORM_ITEMS:
            raise BadRequestError(f"Malformed form body: more than {MAX_FORM_ITEMS} {'files' if is_file else 'fields'}")
        media = None
        if is_file:
            media = part.get(b"content-type", b"").split(b";", 1)[0].strip().decode("latin-1")
            media = media or "application/octet-stream"
        fields[name] = Field(name, media, b"".join(data))

    callbacks: MultipartCallbacks = {
        "on_part_begin": on_part_begin,
        "on_header_field": on_header_field,
        "on_header_value": on_header_value,
        "on_header_end": on_header_end,
        "on_part_data": on_part_data,
        "on_part_end": on_part_end,
    }
    try:
        parser = MultipartParser(boundary, callbacks)
        parser.write(body)
        parser.finalize()
    except BadRequestError:
        raise
    except Exception as exc:
        raise BadRequestError(f"Malformed form body: {exc}") from None
    return tuple(fields.values())


ErrorRenderer = Callable[[ServekitError, dict[str, str]], Response]


def torchserve_error(exc: ServekitError, headers: dict[str, str]) -> Response:
    return error_response(exc.status_code, exc.type_name, exc.message, headers)


async def submit(
    model: Model,
    request_id: str,
    read: Callable[[], Awaitable[tuple[tuple[Field, ...], float | None]]],
    headers: dict[str, str],
    url_version: str,
    hooks: Hooks | None = None,
) -> WorkerResponse:
    """Read a request's inputs and queueing budget (``read``), queue them for ``model`` with ``headers`` (what the
    handler sees) and return the worker's answer: the path every inference request takes, over HTTP
    (``run_request``) or gRPC (``servekit.grpc.inference``). Counts and times it; logs a failure once with its
    request id, then raises it. A caller that is cancelled while it waits (a gRPC client that went away) is counted
    as a 499 and its request dropped from the queue."""
    start = time.perf_counter()
    status = 500
    queued_from: float | None = None  # when it was queued, once a worker answered it
    try:
        fields, timeout_s = await read()
        arrival = time.perf_counter()
        result = await model.infer(WorkerRequest(request_id, headers, fields), timeout_s, hooks)
        status, queued_from = result.status, arrival
        return result
    except ServekitError as exc:
        status = exc.status_code
        if not exc.logged:
            level = logging.ERROR if status >= 500 and status not in (503, 504) else logging.WARNING
            extra = {"request_id": request_id, "model": model.name}
            logger.log(level, "request %s to model %s: %d %s", request_id, model.name, status, exc.message, extra=extra)
        raise
    except asyncio.CancelledError:
        status = ClientDisconnectedError.status_code
        raise
    finally:
        sent = model.pool.sent.pop(request_id, None)  # when its batch went to a worker, if it went
        queued_s = None if queued_from is None or sent is None else max(0.0, sent - queued_from)
        model.metrics.request(url_version, status, time.perf_counter() - start, queued_s)


async def run_request(
    model: Model,
    scope: Scope,
    headers: dict[str, str],
    read: Callable[[], Awaitable[tuple[tuple[Field, ...], float | None]]],
    url_version: str,
    render_error: ErrorRenderer = torchserve_error,
    route_headers: Mapping[str, str] = PREDICTION_HEADERS,
) -> Response:
    """Read a request's inputs and queueing budget (``read``), queue them for ``model``, and answer: the shared
    path of every inference route. The handler sees the request's headers and the route's (``url_path`` and
    ``explain`` by default). Counts and times it, logs a failure once with its request id, and sends
    ``x-request-id``."""
    request_id = new_request_id()
    try:
        worker_headers = {**headers, **route_headers}
        result = await submit(model, request_id, read, worker_headers, url_version, disconnect_hooks(scope))
    except ServekitError as exc:
        return render_error(exc, {**exc.headers, "x-request-id": request_id})
    out_headers = {k: v for k, v in result.headers.items() if k.lower() not in FRAMING_HEADERS}
    if result.headers and any(k.lower() in NO_CACHE for k in out_headers):  # the server sends TorchServe's instead
        out_headers = {k: v for k, v in out_headers.items() if k.lower() not in NO_CACHE}
    if result.content_type is not None:  # as the handler set it: a media_type would get "; charset=utf-8" added
        out_headers["content-type"] = result.content_type
    out_headers["x-request-id"] = request_id
    response: Response
    if result.more is not None:  # streamed: the first chunk now, the rest as the worker sends them
        response = StreamingResponse(_chunks(result.payload, result.more), result.status, out_headers)
    else:
        response = Response(result.payload, result.status, out_headers)
    # TorchServe's status line has the handler's phrase, or none ("HTTP/1.1 200 "): read by servekit.api.response
    response.reason_phrase = result.reason or ""  # type: ignore[attr-defined]
    return response


async def _chunks(first: bytes, rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    yield first
    async for chunk in rest:
        yield chunk
