"""The inference API (port 8080): ``/ping`` and ``/predictions/{model}[/{version}]``."""

from __future__ import annotations

import uuid

from fastapi import FastAPI, Request
from starlette.datastructures import UploadFile
from starlette.responses import JSONResponse, Response

from servekit.api.auth import TokenAuth, TokenStore
from servekit.api.errors import install_error_handlers
from servekit.errors import BadRequestError, RequestTooLargeError
from servekit.metrics import Metrics
from servekit.protocol import Field
from servekit.protocol import Request as WorkerRequest
from servekit.registry import ModelRegistry

FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")
ANY_METHOD = ["GET", "POST", "PUT", "DELETE", "PATCH"]


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, refused with 413 as soon as it is known to exceed ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
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


def create_inference_app(registry: ModelRegistry, metrics: Metrics, tokens: TokenStore | None = None) -> FastAPI:
    app = FastAPI(title="servekit inference API", openapi_url=None, docs_url=None, redoc_url=None)
    install_error_handlers(app)
    if tokens is not None:
        app.add_middleware(TokenAuth, store=tokens, kind="inference", open_paths=("/ping",))
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
        headers = dict(request.headers)
        headers.update(url_path="", explain="False")
        fields = await read_fields(request, limit)
        with metrics.track(model_name, version or "default"):
            result = await model.infer(WorkerRequest(request_id, headers, fields))
        out_headers = {**result.headers, "x-request-id": request_id}
        return Response(result.payload, result.status, out_headers, media_type=result.content_type)

    return app
