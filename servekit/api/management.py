"""The management API (port 8081): list and describe models, with TorchServe's paths and field names."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from fastapi import FastAPI
from starlette.responses import JSONResponse

from servekit.api.errors import install_error_handlers
from servekit.registry import Model, ModelRegistry


def describe(model: Model) -> dict[str, Any]:
    """TorchServe's describe fields for one model version."""
    s = model.settings
    return {
        "modelName": model.name,
        "modelVersion": model.version,
        "modelUrl": model.url,
        "runtime": model.spec.runtime,
        "minWorkers": s.min_workers,
        "maxWorkers": s.max_workers,
        "batchSize": s.batch_size,
        "maxBatchDelay": s.max_batch_delay,
        "responseTimeout": int(s.response_timeout),
        "startupTimeout": int(s.startup_timeout),
        "deviceType": s.device_type,
        "loadedAtStartup": model.loaded_at_startup,
        "workers": [
            {
                "id": w.id,
                "startTime": datetime.fromtimestamp(w.start_time, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z",
                "status": w.status,
                "pid": w.pid,
                "gpu": w.gpu_id is not None,
            }
            for w in model.pool.workers
        ],
        "jobQueueStatus": {
            "remainingCapacity": s.job_queue_size - model.batcher.depth,
            "pendingRequests": model.batcher.depth,
        },
    }


def create_management_app(registry: ModelRegistry) -> FastAPI:
    app = FastAPI(title="servekit management API", openapi_url=None, docs_url=None, redoc_url=None)
    install_error_handlers(app)

    @app.get("/models")
    async def list_models(limit: str = "100", next_page_token: str = "0") -> JSONResponse:
        size = int(limit) if limit.isdigit() and 0 < int(limit) <= 100 else 100
        start = int(next_page_token) if next_page_token.isdigit() else 0
        models = registry.defaults()
        page = [{"modelName": m.name, "modelUrl": m.url} for m in models[start : start + size]]
        body: dict[str, Any] = {"models": page}
        if start + size < len(models):
            body = {"nextPageToken": str(start + size), **body}
        return JSONResponse(body)

    @app.get("/models/{name}")
    async def describe_default(name: str) -> JSONResponse:
        return JSONResponse([describe(registry.get(name))])

    @app.get("/models/{name}/{version}")
    async def describe_version(name: str, version: str) -> JSONResponse:
        models = registry.versions(name) if version == "all" else [registry.get(name, version)]
        return JSONResponse([describe(m) for m in models])

    return app
