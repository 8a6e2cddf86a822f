"""The Open Inference Protocol (KServe v2) and KServe v1 on the inference port.

v2: ``/v2``, ``/v2/health/live|ready``, ``/v2/models/{m}[/versions/{v}]`` (metadata), ``.../ready`` and
``.../infer`` with tensors as JSON or in the binary tensor extension. Requests are parsed and validated against the
model's metadata (the model config's ``inputs`` and ``outputs``) before they are queued, then go through the same
batcher as ``/predictions``; the worker batches them along the first dimension. Errors are ``{"error": "..."}``.

v1: ``/v1/models``, ``/v1/models/{m}``, ``POST /v1/models/{m}:predict`` with ``{"instances": [...]}`` in and
``{"predictions": [...]}`` out (the instances are the model's first input, batched along the first dimension).
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import JSONResponse, Response
from starlette.types import Scope

from servekit.api.dispatch import (
    PREDICTION_HEADERS,
    header_map,
    read_body,
    read_fields,
    request_timeout,
    run_request,
    torchserve_error,
)
from servekit.api.response import new_request_id
from servekit.errors import BadRequestError, ServekitError
from servekit.handler import SERVER_VERSION
from servekit.model import Model
from servekit.oip import BODY_FIELD, HEADER_LENGTH, V2_CONTENT_TYPE, body_value, timeout_of
from servekit.protocol import Field
from servekit.registry import ModelRegistry

EXTENSIONS = ["binary_tensor_data"]
EXPLANATION_HEADERS = {**PREDICTION_HEADERS, "explain": "True"}  # what TorchServe adds to an explanation request


def v2_error(exc: ServekitError, headers: dict[str, str]) -> Response:
    return JSONResponse({"error": exc.message}, exc.status_code, headers)


def header_length(headers: dict[str, str]) -> int | None:
    value = headers.get(HEADER_LENGTH)
    if value is None:
        return None
    if not (value.isascii() and value.isdigit()):
        raise BadRequestError(f"{HEADER_LENGTH} must be a non-negative integer, got {value!r}")
    return int(value)


def metadata(model: Model, versions: list[str]) -> dict[str, Any]:
    return {
        "name": model.name,
        "versions": versions,
        "platform": "pytorch_torchscript" if not model.spec.manifest["model"].get("modelFile") else "pytorch",
        "inputs": [spec.to_json() for spec in model.inputs],
        "outputs": [spec.to_json() for spec in model.outputs],
    }


def create_v2_router(registry: ModelRegistry) -> APIRouter:
    router = APIRouter()
    limit = registry.settings.max_request_size
    enveloped = registry.settings.service_envelope is not None

    def lookup(name: str, version: str | None) -> Model:
        return registry.get(name, version)

    @router.get("/v2")
    async def server_metadata() -> JSONResponse:
        return JSONResponse({"name": "servekit", "version": SERVER_VERSION, "extensions": EXTENSIONS})

    @router.get("/v2/health/live")
    async def live() -> JSONResponse:
        return JSONResponse({"live": True})

    @router.get("/v2/health/ready")
    async def ready() -> JSONResponse:
        healthy = registry.healthy()
        return JSONResponse({"ready": healthy}, 200 if healthy else 400)

    @router.get("/v2/models/{name}")
    async def model_metadata_default(name: str) -> Response:
        return await model_metadata(name, None)

    @router.get("/v2/models/{name}/versions/{version}")
    async def model_metadata(name: str, version: str | None) -> Response:
        try:
            model = lookup(name, version)
            versions = [m.version for m in registry.versions(name)]
        except ServekitError as exc:
            return v2_error(exc, {})
        return JSONResponse(metadata(model, versions))

    @router.get("/v2/models/{name}/ready")
    async def model_ready_default(name: str) -> Response:
        return await model_ready(name, None)

    @router.get("/v2/models/{name}/versions/{version}/ready")
    async def model_ready(name: str, version: str | None) -> Response:
        try:
            model = lookup(name, version)
        except ServekitError as exc:
            return v2_error(exc, {})
        is_ready = model.pool.ready > 0
        return JSONResponse({"name": model.name, "ready": is_ready}, 200 if is_ready else 400)

    async def through_handler(name: str, version: str | None, request: Request, explain: bool) -> Response:
        """The body as sent to the handler (inside the envelope, if one is configured), as TorchServe does."""
        try:
            model = lookup(name, version)
        except ServekitError as exc:
            return torchserve_error(exc, {})

        async def read() -> tuple[tuple[Field, ...], float | None]:
            return read_fields(headers, await read_body(request.receive, headers, limit)), request_timeout(headers)

        headers = header_map(request.scope)
        route_headers = EXPLANATION_HEADERS if explain else PREDICTION_HEADERS
        return await run_request(model, request.scope, headers, read, version or "default", torchserve_error,
                                 route_headers)  # fmt: skip

    @router.api_route("/explanations/{name}", methods=["POST", "PUT"])
    async def explain_default(name: str, request: Request) -> Response:
        return await through_handler(name, None, request, explain=True)

    @router.api_route("/explanations/{name}/{version}", methods=["POST", "PUT"])
    async def explain(name: str, version: str, request: Request) -> Response:
        return await through_handler(name, version, request, explain=True)

    @router.post("/v1/models/{name}:explain")
    async def v1_explain(name: str, request: Request) -> Response:
        return await through_handler(name, None, request, explain=True)

    @router.post("/v2/models/{name}/explain")
    async def v2_explain_default(name: str, request: Request) -> Response:
        return await through_handler(name, None, request, explain=True)

    @router.post("/v2/models/{name}/versions/{version}/explain")
    async def v2_explain(name: str, version: str, request: Request) -> Response:
        return await through_handler(name, version, request, explain=True)

    @router.post("/v2/models/{name}/infer")
    async def infer_default(name: str, request: Request) -> Response:
        return await infer(name, None, request)

    @router.post("/v2/models/{name}/versions/{version}/infer")
    async def infer(name: str, version: str | None, request: Request) -> Response:
        if enveloped:
            return await through_handler(name, version, request, explain=False)
        headers = header_map(request.scope)
        body = functools.partial(read_body, request.receive, headers, limit)
        return await infer_tensors(registry, request.scope, headers, name, version, body)

    @router.get("/v1/models")
    async def v1_models() -> JSONResponse:
        return JSONResponse({"models": [m.name for m in registry.defaults()]})

    @router.get("/v1/models/{name}")
    async def v1_model(name: str) -> Response:
        try:
            model = lookup(name, None)
        except ServekitError as exc:
            return v2_error(exc, {})
        return JSONResponse({"name": model.name, "ready": model.pool.ready > 0})

    @router.post("/v1/models/{name}:predict")
    async def v1_predict(name: str, request: Request) -> Response:
        if enveloped:
            return await through_handler(name, None, request, explain=False)
        headers = header_map(request.scope)
        body = functools.partial(read_body, request.receive, headers, limit)
        return await predict_instances(registry, request.scope, headers, name, body)

    return router


async def infer_tensors(
    registry: ModelRegistry,
    scope: Scope,
    headers: dict[str, str],
    name: str,
    version: str | None,
    body: Callable[[], Awaitable[bytes]],
) -> Response:
    """``POST /v2/models/{m}[/versions/{v}]/infer`` without an envelope: the body is queued as the client sent it,
    and the worker parses it and checks it against the model's metadata (``servekit.oip.worker_request``); ``body``
    reads it once the model is known. Served by the HTTP protocol directly (``servekit.api.inference.Predictions``),
    or by the route above for the requests it leaves to ASGI."""
    try:
        model = registry.get(name, version or None)
    except ServekitError as exc:
        return v2_error(exc, {"x-request-id": new_request_id()})  # as every answer has

    async def read() -> tuple[tuple[Field, ...], float | None]:
        length = header_length(headers)
        raw = await body()
        value = body_value(raw, length, (model.name, model.version), predictions=False)
        return (Field(BODY_FIELD, V2_CONTENT_TYPE, value),), timeout_of(raw, length)

    return await run_request(model, scope, headers, read, version or "default", v2_error)


async def predict_instances(
    registry: ModelRegistry, scope: Scope, headers: dict[str, str], name: str, body: Callable[[], Awaitable[bytes]]
) -> Response:
    """``POST /v1/models/{m}:predict`` without an envelope (KServe v1): the instances as the model's first input,
    the first output as ``predictions``. Served as ``infer_tensors`` is."""
    try:
        model = registry.get(name, None)
    except ServekitError as exc:
        return v2_error(exc, {"x-request-id": new_request_id()})  # as every answer has

    async def read() -> tuple[tuple[Field, ...], float | None]:
        value = body_value(await body(), None, (model.name, model.version), predictions=True)
        return (Field(BODY_FIELD, V2_CONTENT_TYPE, value),), None

    return await run_request(model, scope, headers, read, "default", v2_error)
