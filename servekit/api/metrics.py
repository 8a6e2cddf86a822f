"""The metrics API (port 8082): ``GET /metrics`` in Prometheus text format (and its OpenAPI description)."""

from __future__ import annotations

from fastapi import FastAPI, Request
from starlette.responses import JSONResponse, Response

from servekit.api.errors import install_error_handlers
from servekit.metrics import Metrics

# TorchServe's: the text format its families are written in (servekit.exposition), which servekit's own follow too
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def create_metrics_app(metrics: Metrics) -> FastAPI:
    app = FastAPI(title="servekit metrics API", openapi_url="/api-description", docs_url="/docs", redoc_url=None)
    install_error_handlers(app)

    @app.get(
        "/metrics", openapi_extra={"parameters": [{"name": "name[]", "in": "query", "schema": {"type": "string"}}]}
    )
    async def render(request: Request) -> Response:
        """Prometheus text; repeat ``name[]=<metric>`` to get only those metric families."""
        return Response(metrics.render(request.query_params.getlist("name[]")), media_type=CONTENT_TYPE)

    # OPTIONS as TorchServe answers it (so a browser's CORS preflight gets a 200): the metrics, and at / the description
    app.add_api_route("/metrics", render, methods=["OPTIONS"], include_in_schema=False)

    @app.options("/", include_in_schema=False)
    @app.options("/api-description", include_in_schema=False)  # TorchServe: any method
    async def describe_api() -> Response:
        return JSONResponse(app.openapi())

    return app
