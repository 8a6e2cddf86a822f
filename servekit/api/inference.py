"""The inference API (port 8080): ``/ping``, TorchServe's ``/predictions/{model}[/{version}]``, and the Open
Inference Protocol and KServe v1 routes (``servekit.api.v2``)."""

from __future__ import annotations

from fastapi import FastAPI, Request
from starlette.responses import JSONResponse, Response

from servekit.api.auth import TokenAuth, TokenStore
from servekit.api.dispatch import read_fields, request_timeout, run_request
from servekit.api.errors import install_error_handlers
from servekit.api.v2 import create_v2_router
from servekit.protocol import Field
from servekit.registry import ModelRegistry

ANY_METHOD = ["GET", "POST", "PUT", "DELETE", "PATCH"]


def create_inference_app(registry: ModelRegistry, tokens: TokenStore | None = None) -> FastAPI:
    app = FastAPI(title="servekit inference API", openapi_url="/api-description", docs_url=None, redoc_url=None)
    install_error_handlers(app)
    if tokens is not None:
        open_paths = ("/ping", "/api-description", "/v2/health/live", "/v2/health/ready")
        app.add_middleware(TokenAuth, store=tokens, kind="inference", open_paths=open_paths)
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

        async def read() -> tuple[tuple[Field, ...], float | None]:
            return await read_fields(request, limit), request_timeout(request)

        return await run_request(model, request, read, version or "default")

    app.include_router(create_v2_router(registry))
    return app
