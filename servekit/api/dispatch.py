"""Reading an inference request and answering it: the path every inference route shares (TorchServe's
``/predictions``, the Open Inference Protocol, KServe v1). It works on the ASGI scope and ``receive`` directly,
so that ``/predictions`` needs no Starlette request object.

A request may carry ``X-Servekit-Timeout-Ms``: if it is still queued after that many milliseconds it is answered
504 and never reaches a worker. A request whose client disconnects while it waits is dropped from the queue (the
connection's disconnect hooks, ``servekit.api.http``).
"""

from __future__ import annotations

import itertools
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping

from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope

from servekit.api.errors import error_response
from servekit.api.http import disconnect_hooks
from servekit.errors import BadRequestError, ClientDisconnectedError, RequestTooLargeError, ServekitError
from servekit.protocol import Field
from servekit.protocol import Request as WorkerRequest
from servekit.registry import Model

logger = logging.getLogger("servekit.inference")
FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")
TIMEOUT_HEADER = "x-servekit-timeout-ms"
FRAMING_HEADERS = frozenset({"content-length", "transfer-encoding", "connection"})  # the server's, not a handler's


def header_map(scope: Scope) -> dict[str, str]:
    """The request's headers by lower-case name (the last of repeated ones), as a handler sees them."""
    return {name.decode("latin-1"): value.decode("latin-1") for name, value in scope["headers"]}


_ID_PREFIX = uuid.uuid4().hex[:20]  # random per process; a counter makes each id unique at no system call
_id_counter = itertools.count()


def new_request_id() -> str:
    """A request id in UUID form (as TorchServe's): a per-process random prefix and a counter."""
    p = _ID_PREFIX
    return f"{p[:8]}-{p[8:12]}-{p[12:16]}-{p[16:]}-{next(_id_counter):012x}"


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


async def read_fields(scope: Scope, headers: Mapping[str, str], body: bytes) -> tuple[Field, ...]:
    """The request's inputs as TorchServe passes them: form fields by name, or the raw ``body``."""
    content_type = headers.get("content-type")
    mime = content_type.split(";", 1)[0].strip().lower() if content_type else None
    if mime not in FORM_TYPES:
        return (Field("body", mime, body),)
    request = Request(scope)
    request._body = body  # Starlette parses the form from the body it already holds
    try:
        form = await request.form()
    except Exception as exc:
        raise BadRequestError(f"Malformed form body: {exc}") from None
    fields: dict[str, Field] = {}
    for name, value in form.multi_items():
        if isinstance(value, UploadFile):
            fields[name] = Field(name, value.content_type, await value.read())
        else:
            fields[name] = Field(name, None, value.encode())
    await form.close()
    return tuple(fields.values())


ErrorRenderer = Callable[[ServekitError, dict[str, str]], Response]


def torchserve_error(exc: ServekitError, headers: dict[str, str]) -> Response:
    return error_response(exc.status_code, type(exc).__name__, exc.message, headers)


async def run_request(
    model: Model,
    scope: Scope,
    headers: dict[str, str],
    read: Callable[[], Awaitable[tuple[tuple[Field, ...], float | None]]],
    url_version: str,
    render_error: ErrorRenderer = torchserve_error,
) -> Response:
    """Read a request's inputs and queueing budget (``read``), queue them for ``model``, and answer: the shared
    path of every inference route. Counts and times it, logs a failure once with its request id, and sends
    ``x-request-id``."""
    request_id = new_request_id()
    start = time.perf_counter()
    status = 500
    try:
        fields, timeout_s = await read()
        worker_headers = {**headers, "url_path": "", "explain": "False"}
        result = await model.infer(
            WorkerRequest(request_id, worker_headers, fields), timeout_s, disconnect_hooks(scope)
        )
        status = result.status
    except ServekitError as exc:
        status = exc.status_code
        if not exc.logged:
            level = logging.ERROR if status >= 500 and status not in (503, 504) else logging.WARNING
            extra = {"request_id": request_id, "model": model.name}
            logger.log(level, "request %s to model %s: %d %s", request_id, model.name, status, exc.message, extra=extra)
        return render_error(exc, {**exc.headers, "x-request-id": request_id})
    finally:
        model.metrics.request(url_version, status, time.perf_counter() - start)
    out_headers = {k: v for k, v in result.headers.items() if k.lower() not in FRAMING_HEADERS}
    out_headers["x-request-id"] = request_id
    if result.more is not None:  # streamed: the first chunk now, the rest as the worker sends them
        return StreamingResponse(_chunks(result.payload, result.more), result.status, out_headers, result.content_type)
    return Response(result.payload, result.status, out_headers, media_type=result.content_type)


async def _chunks(first: bytes, rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    yield first
    async for chunk in rest:
        yield chunk
