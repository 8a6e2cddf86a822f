"""The metrics API (port 8082): ``GET /metrics`` in Prometheus text format."""

from __future__ import annotations

from fastapi import FastAPI
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.responses import Response

from servekit.api.errors import install_error_handlers
from servekit.metrics import Metrics


def create_metrics_app(metrics: Metrics) -> FastAPI:
    app = FastAPI(title="servekit metrics API", openapi_url="/api-description", docs_url=None, redoc_url=None)
    install_error_handlers(app)

    @app.get("/metrics")
    async def render() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app
