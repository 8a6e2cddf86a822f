"""Reading an inference request and answering it: the path every inference route shares (TorchServe's
``/predictions``, the Open Inference Protocol, KServe v1).

A request may carry ``X-Servekit-Timeout-Ms``: if it is still queued after that many milliseconds it is answered
504 and never reaches a worker. A request whose client disconnects while it waits is dropped from the queue.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import TypeVar

from fastapi import Request
from starlette.datastructures import UploadFile
from starlette.responses import Response

from servekit.api.errors import error_response
from servekit.errors import BadRequestError, ClientDisconnectedError, RequestTooLargeError, ServekitError
from servekit.protocol import Field
from servekit.protocol import Request as WorkerRequest
from servekit.registry import Model

T = TypeVar("T")
logger = logging.getLogger("servekit.inference")
FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")
TIMEOUT_HEADER = "x-servekit-timeout-ms"


def request_timeout(request: Request) -> float | None:
    """The client's queueing budget in seconds (``X-Servekit-Timeout-Ms``), or ``None``."""
    value = request.headers.get(TIMEOUT_HEADER)
    if value is None:
        return None
    try:
        timeout_ms = float(value)
    except ValueError:
        raise BadRequestError(f"{TIMEOUT_HEADER} must be a number of milliseconds, got {value!r}") from None
    if not 0 < timeout_ms < 1e9:
        raise BadRequestError(f"{TIMEOUT_HEADER} must be positive, got {value!r}")
    return timeout_ms / 1000


async def until_disconnected(request: Request) -> None:
    """Returns when the client has gone (or the response is complete)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``; if the client disconnects first, cancel it (a queued request then never runs)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(until_disconnected(request))
    try:
        await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        raise ClientDisconnectedError("The client disconnected before the response was ready")
    return task.result()


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, refused with 413 as soon as it is known to exceed ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isascii() and declared.isdigit() and int(declared) > limit:
        raise RequestTooLargeError(int(declared), limit)
    chunks = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestTooLargeError(size, limit)
        chunks.append(chunk)
    return b"".join(chunks)


async def read_fields(request: Request, limit: int) -> tuple[Field, ...]:
    """The request's inputs as TorchServe passes them: form fields by name, or the raw ``body``."""
    content_type = request.headers.get("content-type")
    mime = content_type.split(";", 1)[0].strip().lower() if content_type else None
    body = await read_body(request, limit)
    if mime not in FORM_TYPES:
        return (Field("body", mime, body),)
    # Starlette parses the form from the body it already holds.
    request._body = body
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
    request: Request,
    read: Callable[[], Awaitable[tuple[tuple[Field, ...], float | None]]],
    url_version: str,
    render_error: ErrorRenderer = torchserve_error,
) -> Response:
    """Read a request's inputs (``read``), queue them for ``model``, and answer: the shared path of every inference
    route. Counts and times it, logs a failure once with its request id, and sends ``x-request-id``."""
    request_id = str(uuid.uuid4())
    start = time.perf_counter()
    status = 500
    try:
        fields, timeout_s = await read()
        headers = dict(request.headers)
        headers.update(url_path="", explain="False")
        work = model.infer(WorkerRequest(request_id, headers, fields), timeout_s)
        result = await unless_disconnected(request, work)
        status = result.status
    except ServekitError as exc:
        status = exc.status_code
        level = logging.ERROR if status >= 500 and status not in (503, 504) else logging.WARNING
        extra = {"request_id": request_id, "model": model.name}
        logger.log(level, "request %s to model %s: %d %s", request_id, model.name, status, exc.message, extra=extra)
        return render_error(exc, {**exc.headers, "x-request-id": request_id})
    finally:
        model.metrics.request(url_version, status, time.perf_counter() - start)
    out_headers = {**result.headers, "x-request-id": request_id}
    return Response(result.payload, result.status, out_headers, media_type=result.content_type)
