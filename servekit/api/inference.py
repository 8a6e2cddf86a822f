"""The inference API (port 8080): ``/ping``, TorchServe's ``/predictions/{model}[/{version}]``, and the Open
Inference Protocol and KServe v1 routes (``servekit.api.v2``)."""

from __future__ import annotations

import logging
import time
from typing import Any

import orjson
from fastapi import FastAPI, Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Scope

from servekit.api.access import AccessLog
from servekit.api.auth import TokenAuth, TokenStore
from servekit.api.dispatch import header, header_map, read_body, read_fields, request_timeout, run_request
from servekit.api.errors import error_response, install_error_handlers
from servekit.api.http import Raw, new_request_id
from servekit.api.v2 import create_v2_router
from servekit.errors import RequestTooLargeError, ServekitError, error_body
from servekit.metrics import Metrics
from servekit.protocol import Field
from servekit.registry import ModelRegistry

ANY_METHOD = ["GET", "POST", "PUT", "DELETE", "PATCH"]
PREFIX = "/predictions/"
V2_PREFIX = "/v2/models/"
V1_PREFIX = "/v1/models/"
OPEN_PATHS = ("/ping", "/api-description", "/docs", "/v2/health/live", "/v2/health/ready")
logger = logging.getLogger("servekit.inference")


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


class Predictions:
    """``/predictions/{model}[/{version}]``: answered by the HTTP protocol directly (``servekit.api.http``), with
    its token check, counting and access log here, skipping FastAPI's routing, dependency solving and middleware
    and ASGI's messages (they cost about 40 % of the front end's time per request; see benchmarks/RESULTS.md).
    The few requests the protocol leaves to ASGI (pipelined ones, ``Expect: 100-continue``) reach ``answer``
    through FastAPI routes."""

    def __init__(self, registry: ModelRegistry, tokens: TokenStore | None, access: AccessLog) -> None:
        self.registry = registry
        self.tokens = tokens
        self.access = access
        self.limit = registry.settings.max_request_size
        self._refusals: dict[tuple[str, bool], bytes] = {}  # error bodies by message and protocol

    def matches(self, method: str, path: str) -> bool:
        if not path.startswith(PREFIX) or method not in ANY_METHOD:
            return False
        parts = path[len(PREFIX) :].split("/")
        return 1 <= len(parts) <= 2 and all(parts)

    async def __call__(self, scope: dict[str, Any], body: bytes) -> Response:
        start = time.perf_counter()
        response = await self.answer(scope, body)
        self.access.done(scope, response.status_code, start)
        return response

    def refuse(self, scope: dict[str, Any]) -> Raw | None:
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
        error = model.batcher.refusal()
        if error is None:
            return None
        start = time.perf_counter()
        model.metrics.request(version or "default", error.status_code, 0.0)
        self.access.done(scope, error.status_code, start)
        body = self._refusals.get((error.message, oip))
        if body is None:
            if len(self._refusals) > 1000:  # messages name models: bounded like the models themselves
                self._refusals.clear()
            body = (
                orjson.dumps({"error": error.message}) if oip else error_body(503, type(error).__name__, error.message)
            )
            self._refusals[error.message, oip] = body
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"retry-after", b"1"),  # the protocol says more when the connection rests longer
            (b"x-request-id", new_request_id().encode()),
        ]
        return error.status_code, headers, body

    def too_large(self, scope: dict[str, Any], size: int) -> Response:
        """The 413 for a body over the limit; without ``x-request-id``, as TorchServe's (answered by Netty before
        the request has an id)."""
        exc = RequestTooLargeError(size, self.limit)
        self.access.done(scope, exc.status_code, time.perf_counter())
        return error_response(exc.status_code, type(exc).__name__, exc.message, exc.headers)

    async def answer(self, scope: Scope, body: bytes) -> Response:
        name, _, version = scope["path"][len(PREFIX) :].partition("/")
        headers = header_map(scope)
        try:
            if self.tokens is not None:
                self.tokens.check("inference", headers.get("authorization"))
            model = self.registry.get(name, version or None)

            async def read() -> tuple[tuple[Field, ...], float | None]:
                fields = read_fields(headers, body)
                if model.pool.input_check is not None:
                    model.pool.input_check(fields)  # a bad input never takes a place in a batch
                return fields, request_timeout(headers)

            return await run_request(model, scope, headers, read, version or "default")
        except ServekitError as exc:  # before the request was queued: no key, no such model
            return error_response(exc.status_code, type(exc).__name__, exc.message, _with_id(exc.headers))
        except Exception:  # a bug of ours: log it, answer JSON as for every other error
            logger.exception("unexpected error serving %s", scope["path"])
            return error_response(500, "InternalServerError", "Internal server error", _with_id({}))


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
            return JSONResponse({"status": "Healthy"})
        return JSONResponse({"status": "Unhealthy"}, status_code=500)

    @app.api_route("/predictions/{model_name}", methods=ANY_METHOD)
    async def predict_default(model_name: str, request: Request) -> Response:
        return await predictions.answer(request.scope, await read_body(request.receive, request.headers, limit))

    @app.api_route("/predictions/{model_name}/{version}", methods=ANY_METHOD)
    async def predict(model_name: str, version: str, request: Request) -> Response:
        return await predictions.answer(request.scope, await read_body(request.receive, request.headers, limit))

    app.include_router(create_v2_router(registry))
    rest: ASGIApp = app if tokens is None else TokenAuth(app, store=tokens, kind="inference", open_paths=OPEN_PATHS)
    access = AccessLog(rest, metrics, registry.settings.access_log)
    predictions = Predictions(registry, tokens, access)
    return access, predictions
