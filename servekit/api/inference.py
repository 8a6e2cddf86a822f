"""The inference API (port 8080): ``/ping``, TorchServe's ``/predictions/{model}[/{version}[/{url_path...}]]``,
its SageMaker (``/invocations``, ``/models/{model}/invoke``) and legacy (``/{model}[/{version}]/predict``) routes,
the OpenAPI description (``OPTIONS /``, and of one model ``OPTIONS`` on its routes), and the Open Inference Protocol
and KServe v1 routes (``servekit.api.v2``)."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

import orjson
from fastapi import FastAPI, Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Scope

from servekit.api.access import AccessLog
from servekit.api.auth import TokenAuth, TokenStore
from servekit.api.dispatch import (
    PREDICTION_HEADERS,
    header,
    header_map,
    read_body,
    read_fields,
    request_timeout,
    run_request,
)
from servekit.api.errors import error_response, install_error_handlers
from servekit.api.frontend import FrontendJSON
from servekit.api.response import Refusal, new_request_id
from servekit.api.v2 import create_v2_router, infer_tensors, predict_instances
from servekit.errors import BadRequestError, RequestTooLargeError, ServekitError, error_body
from servekit.metrics import Metrics
from servekit.protocol import Field
from servekit.registry import ModelRegistry

ANY_METHOD = ["GET", "POST", "PUT", "DELETE", "PATCH"]
HEAD_TOO = [*ANY_METHOD, "HEAD"]  # HEAD is answered through ASGI (uvicorn sends the head only), never directly
PREFIX = "/predictions/"
V2_PREFIX = "/v2/models/"
V1_PREFIX = "/v1/models/"
OPEN_PATHS = ("/ping", "/api-description", "/docs", "/v2/health/live", "/v2/health/ready")
MODEL_ROUTES = (  # a model's inference routes besides /predictions (whose OPTIONS routes are declared apart)
    "/explanations/{model_name}",
    "/explanations/{model_name}/{version}",
    "/v1/models/{model_name}:predict",
    "/v1/models/{model_name}:explain",
    "/v2/models/{model_name}/infer",
    "/v2/models/{model_name}/explain",
    "/v2/models/{model_name}/versions/{version}/infer",
    "/v2/models/{model_name}/versions/{version}/explain",
)
logger = logging.getLogger("servekit.inference")


@functools.lru_cache(maxsize=4096)  # asked three times per request (matches, refuse, the route), for a few paths
def inference_target(method: str, path: str) -> tuple[str, str, bool] | None:
    """The model name and version (empty: the default) an inference request is for, and whether it speaks the Open
    Inference Protocol or KServe v1 (whose errors are ``{"error": ...}``); ``None`` for any other request."""
    if path.startswith(PREFIX):
        name, _, version = path[len(PREFIX) :].partition("/")
        return (name, version, False) if method in ANY_METHOD else None
    if method != "POST":
        return None
    if path.startswith(V2_PREFIX) and path.endswith("/infer"):
        name, _, version = path[len(V2_PREFIX) : -len("/infer")].partition("/versions/")
        return name, version, True
    if path.startswith(V1_PREFIX) and path.endswith(":predict"):
        return path[len(V1_PREFIX) : -len(":predict")], "", True
    return None


@dataclass(frozen=True, slots=True)
class Route:
    """How TorchServe serves an inference request other than ``/predictions/{model}[/{version}]``: the model
    (``None``: the request's ``model_name`` input), its version (empty: the default), inputs from the query string
    (before the body's: a body input of the same name wins) and the headers TorchServe adds for the handler."""

    name: str | None
    version: str = ""
    query: tuple[Field, ...] = ()
    headers: Mapping[str, str] = field(default_factory=dict)


def query_fields(scope: Scope) -> tuple[Field, ...]:
    """The query string's parameters as inputs (UTF-8 bytes, no content type), as TorchServe's legacy and SageMaker
    routes pass them."""
    query = scope["query_string"].decode("utf-8", "replace")
    return tuple(Field(k, None, v.encode()) for k, v in parse_qsl(query, keep_blank_values=True))


def model_api(name: str) -> dict[str, Any]:
    """The OpenAPI description of one model's inference routes (TorchServe's ``OpenApiUtils.getModelApi``)."""
    operation = {
        "description": f"A predict entry point for model: {name}.",
        "operationId": name,
        "responses": {"200": {"description": "OK"}, "500": {"description": "Internal Server Error"}},
    }
    paths = (f"/predictions/{name}", "/v1/models/{model_name}:predict", "/v2/models/{model_name}/infer")
    info = {"title": f"RESTful API for: {name}", "version": "1.0.0"}
    return {"openapi": "3.0.1", "info": info, "paths": {path: {"post": operation} for path in paths}}


class Predictions:
    """``/predictions/{model}[/{version}]``, and without an envelope v2 ``infer`` and v1 ``:predict``: answered by
    the HTTP protocol directly (``servekit.api.http``), with their token check, counting and access log here,
    skipping FastAPI's routing, dependency solving and middleware and ASGI's messages (they cost about 40 % of the
    front end's time per request; see benchmarks/RESULTS.md). The few requests the protocol leaves to ASGI
    (pipelined ones, ``Expect: 100-continue``) reach the same code through FastAPI routes."""

    def __init__(self, registry: ModelRegistry, tokens: TokenStore | None, access: AccessLog) -> None:
        self.registry = registry
        self.tokens = tokens
        self.access = access
        self.limit = registry.settings.max_request_size
        self.enveloped = registry.settings.service_envelope is not None
        self._refusals: dict[tuple[str, bool], Refusal] = {}  # by message and protocol

    def matches(self, method: str, path: str) -> bool:
        if path.startswith(PREFIX):
            parts = path[len(PREFIX) :].split("/")
            return method in ANY_METHOD and 1 <= len(parts) <= 2 and all(parts)
        if self.enveloped:  # the envelope's routes go through the handler: FastAPI's routes serve them
            return False
        target = inference_target(method, path)  # v2 infer, v1 predict
        return target is not None and bool(target[0]) and "/" not in target[0] and "/" not in target[1]

    async def __call__(self, scope: dict[str, Any], body: bytes) -> Response:
        start = time.perf_counter()
        if scope["path"].startswith(PREFIX):
            response = await self.answer(scope, body)
        else:
            response = await self.answer_tensors(scope, body)
        self.access.done(scope, response.status_code, start)
        return response

    async def answer_tensors(self, scope: Scope, body: bytes) -> Response:
        """Serve v2 ``infer`` or v1 ``:predict`` (no envelope) as ``servekit.api.v2`` does through FastAPI."""
        name, version, _ = inference_target(scope["method"], scope["path"]) or ("", "", True)
        headers = header_map(scope)
        try:
            if self.tokens is not None:
                self.tokens.check("inference", headers.get("authorization"))
        except ServekitError as exc:
            return error_response(exc.status_code, exc.type_name, exc.message, _with_id(exc.headers))

        async def given() -> bytes:
            return body

        if scope["path"].startswith(V2_PREFIX):
            return await infer_tensors(self.registry, scope, headers, name, version or None, given)
        return await predict_instances(self.registry, scope, headers, name, given)

    def refuse(self, scope: dict[str, Any]) -> Refusal | None:
        """The 503 for a request that cannot be queued now (queue full, no worker, unregistering), decided from its
        head: the body is never parsed and the refusal costs a fraction of a served request, so that under overload
        the front end's time goes to the requests it serves. ``None`` when the request may be queued, or is not for
        a known model with a valid key (the full path answers those)."""
        target = inference_target(scope["method"], scope["path"])
        if target is None:
            return None
        name, version, oip = target
        try:
            if self.tokens is not None:
                self.tokens.check("inference", header(scope, b"authorization"))
            model = self.registry.get(name, version or None)
        except ServekitError:
            return None
        error = model.batcher.refusal(promise=True)
        if error is None:
            return None
        start = time.perf_counter()
        model.metrics.refused(version or "default", error.status_code)
        self.access.done(scope, error.status_code, start)
        refusal = self._refusals.get((error.message, oip))
        if refusal is None:
            if len(self._refusals) > 1000:  # messages name models: bounded like the models themselves
                self._refusals.clear()
            body = orjson.dumps({"error": error.message}) if oip else error_body(503, error.type_name, error.message)
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
            refusal = self._refusals[error.message, oip] = Refusal(error.status_code, headers, body)
        return refusal

    def too_large(self, scope: dict[str, Any], size: int) -> Response:
        """The 413 for a body over the limit; without ``x-request-id``, as TorchServe's (answered by Netty before
        the request has an id)."""
        exc = RequestTooLargeError(size, self.limit)
        self.access.done(scope, exc.status_code, time.perf_counter())
        if not scope["path"].startswith(PREFIX):  # v2, v1: the protocol's error body
            return JSONResponse({"error": exc.message}, exc.status_code, exc.headers)
        return Response(b"", exc.status_code, exc.headers)  # TorchServe's (Netty's): no body

    async def answer(self, scope: Scope, body: bytes, route: Route | None = None) -> Response:
        """Serve ``/predictions/{model}[/{version}]``, or with ``route`` any other inference route."""
        if route is None:
            name: str | None
            name, _, version = scope["path"][len(PREFIX) :].partition("/")
            query: tuple[Field, ...] = ()
            route_headers = PREDICTION_HEADERS
        else:
            name, version, query, route_headers = route.name, route.version, route.query, route.headers
        headers = header_map(scope)
        try:
            if self.tokens is not None:
                self.tokens.check("inference", headers.get("authorization"))
            inputs: tuple[Field, ...] | None = None
            if name is None:  # TorchServe reads the inputs first, then looks for one named model_name
                inputs = query + read_fields(headers, body)
                name = next((f.value.decode("utf-8", "replace") for f in inputs if f.name == "model_name"), None)
                if name is None:
                    raise BadRequestError("Parameter model_name is required.")
            model = self.registry.get(name, version or None)
            if route is not None and scope["method"] == "OPTIONS":
                return FrontendJSON(model_api(model.name))

            async def read() -> tuple[tuple[Field, ...], float | None]:
                fields = inputs if inputs is not None else read_fields(headers, body)
                if query and inputs is None:
                    fields = query + fields
                if model.pool.input_check is not None:
                    model.pool.input_check(fields)  # a bad input never takes a place in a batch
                return fields, request_timeout(headers)

            return await run_request(model, scope, headers, read, version or "default", route_headers=route_headers)
        except ServekitError as exc:  # before the request was queued: no key, no such model
            return error_response(exc.status_code, exc.type_name, exc.message, _with_id(exc.headers))
        except Exception:  # a bug of ours: log it, answer JSON as for every other error
            logger.exception("unexpected error serving %s", scope["path"])
            return error_response(500, "InternalServerException", "Internal server error", _with_id({}))


def _with_id(headers: dict[str, str]) -> dict[str, str]:
    """``headers`` and a fresh ``x-request-id``, for an answer given before a request had one."""
    return {**headers, "x-request-id": new_request_id()}


def create_inference_app(
    registry: ModelRegistry, metrics: Metrics, tokens: TokenStore | None = None
) -> tuple[ASGIApp, Predictions]:
    """The ASGI app of the port (behind its access log) and the ``/predictions`` route the protocol answers."""
    app = FastAPI(title="servekit inference API", openapi_url="/api-description", docs_url="/docs", redoc_url=None)
    install_error_handlers(app)
    limit = registry.settings.max_request_size

    @app.api_route("/ping", methods=["GET", "POST"])
    async def ping() -> Response:
        if registry.healthy():
            return FrontendJSON({"status": "Healthy"})
        return FrontendJSON({"status": "Unhealthy"}, status_code=500)

    app.add_api_route("/ping", ping, methods=["OPTIONS"], include_in_schema=False)  # TorchServe: any method

    @app.api_route("/predictions/{model_name}", methods=HEAD_TOO)
    async def predict_default(model_name: str, request: Request) -> Response:
        return await predictions.answer(request.scope, await read_body(request.receive, request.headers, limit))

    @app.api_route("/predictions/{model_name}/{version}", methods=HEAD_TOO)
    async def predict(model_name: str, version: str, request: Request) -> Response:
        return await predictions.answer(request.scope, await read_body(request.receive, request.headers, limit))

    @app.options("/", include_in_schema=False)
    @app.options("/api-description", include_in_schema=False)  # TorchServe: any method
    async def describe_api() -> Response:
        return FrontendJSON(app.openapi())

    methods = [*HEAD_TOO, "OPTIONS"]  # OPTIONS: the model's OpenAPI description

    @app.api_route("/predictions/{model_name}/{version}/{url_path:path}", methods=methods)
    async def predict_url_path(model_name: str, version: str, url_path: str, request: Request) -> Response:
        """The path's rest reaches the handler as the ``url_path`` header (without trailing slashes, as TorchServe
        splits paths)."""
        route = Route(model_name, version, headers={"url_path": url_path.rstrip("/"), "explain": "False"})
        return await routed(request, route)

    @app.options("/predictions/{model_name}", include_in_schema=False)
    async def options_default(model_name: str, request: Request) -> Response:
        return await routed(request, Route(model_name))

    @app.options("/predictions/{model_name}/{version}", include_in_schema=False)
    async def options_version(model_name: str, version: str, request: Request) -> Response:
        return await routed(request, Route(model_name, version))

    async def options_model(request: Request) -> Response:
        """``OPTIONS`` on a model's other inference routes: its description, as TorchServe answers (a browser's CORS
        preflight of a ``POST`` there gets a 200)."""
        params = request.path_params
        return await routed(request, Route(params["model_name"], params.get("version", "")))

    for path in MODEL_ROUTES:
        app.add_api_route(path, options_model, methods=["OPTIONS"], include_in_schema=False)

    @app.api_route("/invocations", methods=methods)
    async def sagemaker_invocations(request: Request) -> Response:
        """SageMaker's route: the model is the ``model_name`` query parameter; without one, the only model loaded
        at startup if there is just one, else the request's ``model_name`` input."""
        name = request.query_params.get("model_name")
        if not name:
            startup = {m.name for m in registry.defaults() if m.loaded_at_startup}
            name = startup.pop() if len(startup) == 1 else name
        return await routed(request, Route(name, query=query_fields(request.scope)))

    @app.api_route("/models/{model_name}/invoke", methods=methods)
    async def sagemaker_invoke(model_name: str, request: Request) -> Response:
        return await routed(request, Route(model_name, query=query_fields(request.scope)))

    @app.api_route("/{model_name}/predict", methods=methods)
    async def legacy_predict(model_name: str, request: Request) -> Response:
        return await routed(request, Route(model_name, query=query_fields(request.scope)))

    @app.api_route("/{model_name}/{version}/predict", methods=methods)
    async def legacy_predict_version(model_name: str, version: str, request: Request) -> Response:
        return await routed(request, Route(model_name, version, query=query_fields(request.scope)))

    async def routed(request: Request, route: Route) -> Response:
        return await predictions.answer(request.scope, await read_body(request.receive, request.headers, limit), route)

    app.include_router(create_v2_router(registry))
    rest: ASGIApp = app if tokens is None else TokenAuth(app, store=tokens, kind="inference", open_paths=OPEN_PATHS)
    access = AccessLog(rest, metrics, registry.settings.access_log)
    predictions = Predictions(registry, tokens, access)
    return access, predictions
