"""The inference API (port 8080): ``/ping``, TorchServe's ``/predictions/{model}[/{version}]``, and the Open
Inference Protocol and KServe v1 routes (``servekit.api.v2``)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from fastapi import FastAPI, Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from servekit.api.auth import TokenAuth, TokenStore
from servekit.api.dispatch import read_fields, request_timeout, run_request
from servekit.api.errors import error_response, install_error_handlers
from servekit.api.v2 import create_v2_router
from servekit.errors import ServekitError
from servekit.protocol import Field
from servekit.registry import ModelRegistry

ANY_METHOD = ["GET", "POST", "PUT", "DELETE", "PATCH"]
logger = logging.getLogger("servekit.inference")


Predict = Callable[[str, str | None, Request], Awaitable[Response]]


class PredictionsFastPath:
    """ASGI middleware: ``/predictions/{model}[/{version}]`` goes straight to ``predict``, skipping FastAPI's
    routing, dependency solving and middleware stack, which cost about 40 % of the front end's time per request
    (py-spy, W1 at 64 clients; see benchmarks/RESULTS.md). Every other path goes to the FastAPI app."""

    def __init__(self, app: ASGIApp, predict: Predict) -> None:
        self.app = app
        self.predict = predict

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] == "http" and path.startswith("/predictions/") and scope["method"] in ANY_METHOD:
            parts = path[len("/predictions/") :].split("/")
            if 1 <= len(parts) <= 2 and all(parts):
                try:
                    response = await self.predict(
                        parts[0], parts[1] if len(parts) == 2 else None, Request(scope, receive)
                    )
                except ServekitError as exc:
                    response = error_response(exc.status_code, type(exc).__name__, exc.message, exc.headers)
                except Exception:  # a bug of ours: log it, answer JSON as for every other error
                    logger.exception("unexpected error serving %s", path)
                    response = error_response(500, "InternalServerError", "Internal server error")
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_inference_app(registry: ModelRegistry, tokens: TokenStore | None = None) -> ASGIApp:
    app = FastAPI(title="servekit inference API", openapi_url="/api-description", docs_url=None, redoc_url=None)
    install_error_handlers(app)
    limit = registry.settings.max_request_size

    @app.api_route("/ping", methods=["GET", "POST"])
    async def ping() -> Response:
        if registry.healthy():
            return JSONResponse({"status": "Healthy"})
        return JSONResponse({"status": "Unhealthy"}, status_code=500)

    # Registered for the OpenAPI description; requests reach predict() through PredictionsFastPath.
    @app.api_route("/predictions/{model_name}", methods=ANY_METHOD)
    async def predict_default(model_name: str, request: Request) -> Response:
        return await predict(model_name, None, request)

    @app.api_route("/predictions/{model_name}/{version}", methods=ANY_METHOD)
    async def predict(model_name: str, version: str | None, request: Request) -> Response:
        model = registry.get(model_name, version)

        async def read() -> tuple[tuple[Field, ...], float | None]:
            return await read_fields(request, limit), request_timeout(request)

        return await run_request(model, request, read, version or "default")

    app.include_router(create_v2_router(registry))
    chain: ASGIApp = PredictionsFastPath(app, predict)
    if tokens is not None:
        open_paths = ("/ping", "/api-description", "/v2/health/live", "/v2/health/ready")
        chain = TokenAuth(chain, store=tokens, kind="inference", open_paths=open_paths)
    return chain
