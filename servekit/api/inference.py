"""The inference API (port 8080): ``/ping`` and ``/predictions/{model}[/{version}]``.

A request may carry ``X-Servekit-Timeout-Ms``: if it is still queued after that many milliseconds it is answered
504 and never reaches a worker. A request whose client disconnects while it waits is dropped from the queue.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable
from typing import TypeVar

from fastapi import FastAPI, Request
from starlette.datastructures import UploadFile
from starlette.responses import JSONResponse, Response

from servekit.api.auth import TokenAuth, TokenStore
from servekit.api.errors import error_response, install_error_handlers
from servekit.errors import BadRequestError, ClientDisconnectedError, RequestTooLargeError, ServekitError
from servekit.protocol import Field
from servekit.protocol import Request as WorkerRequest
from servekit.registry import ModelRegistry

T = TypeVar("T")
logger = logging.getLogger("servekit.inference")
FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")
ANY_METHOD = ["GET", "POST", "PUT", "DELETE", "PATCH"]
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


def create_inference_app(registry: ModelRegistry, tokens: TokenStore | None = None) -> FastAPI:
    app = FastAPI(title="servekit inference API", openapi_url="/api-description", docs_url=None, redoc_url=None)
    install_error_handlers(app)
    if tokens is not None:
        app.add_middleware(TokenAuth, store=tokens, kind="inference", open_paths=("/ping", "/api-description"))
    limit = registry.settings.max_request_size

    @app.api_route("/ping", methods=["GET", "POST"])
    async def ping() -> Response:
        if registry.healthy():
            return JSONResponse({"status": "Healthy"})
        return JSONResponse({"status": "Unhealthy"}, status_code=500)

    @app.api_route("/predictions/{model_name}", methods=ANY_METHOD)
    async def predict_default(model_name: str, request: Request) -> Response:
        return await predict(model_name, None, request)

    @app.api_route("/predictions/{model_name}/{version}", methods=ANY_METHOD)
    async def predict(model_name: str, version: str | None, request: Request) -> Response:
        model = registry.get(model_name, version)
        request_id = str(uuid.uuid4())
        start = time.perf_counter()
        status = 500
        try:
            headers = dict(request.headers)
            headers.update(url_path="", explain="False")
            fields = await read_fields(request, limit)
            work = model.infer(WorkerRequest(request_id, headers, fields), request_timeout(request))
            result = await unless_disconnected(request, work)
            status = result.status
        except ServekitError as exc:
            status = exc.status_code
            level = logging.ERROR if status >= 500 and status not in (503, 504) else logging.WARNING
            logger.log(
                level,
                "request %s to model %s: %d %s",
                request_id,
                model.name,
                status,
                exc.message,
                extra={"request_id": request_id, "model": model.name},
            )
            headers = {**exc.headers, "x-request-id": request_id}
            return error_response(exc.status_code, type(exc).__name__, exc.message, headers)
        finally:
            model.metrics.request(version or "default", status, time.perf_counter() - start)
        out_headers = {**result.headers, "x-request-id": request_id}
        return Response(result.payload, result.status, out_headers, media_type=result.content_type)

    return app
