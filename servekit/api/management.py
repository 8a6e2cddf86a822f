"""The management API (port 8081), with TorchServe's paths, parameters, JSON field names and status codes:
register, list, describe, scale, set-default and unregister models. What it shares with the gRPC management API, the
describe fields and the registration, is in ``servekit.api.description`` and ``servekit.api.registration``."""

from __future__ import annotations

import re
from typing import Any

from fastapi import FastAPI, Request
from starlette.responses import JSONResponse, Response

from servekit.api import lenient
from servekit.api.auth import TokenAuth, TokenStore
from servekit.api.description import customized_metadata, describe, model_page
from servekit.api.dispatch import FRAMING_HEADERS, header_map
from servekit.api.errors import install_error_handlers
from servekit.api.frontend import FrontendJSON
from servekit.api.registration import PROCESSING, check_model_api, load_spec, register_model
from servekit.api.response import new_request_id
from servekit.archive import ARCHIVE_SUFFIXES
from servekit.errors import ArchiveNotFoundError, BadRequestError, ServekitError
from servekit.model import Model
from servekit.model_settings import integer
from servekit.protocol import Request as WorkerRequest
from servekit.registry import ModelRegistry

API_DESCRIPTION = "/api-description"
MODEL_PATHS = ("/models/{name}", "/models/{name}/{version}", "/models/{name}/{version}/set-default")


def documented(*names: str, required: tuple[str, ...] = ()) -> dict[str, Any]:
    """OpenAPI for query parameters that a route reads itself (they may also come in a JSON body)."""
    return {
        "parameters": [
            {"name": name, "in": "query", "required": name in required, "schema": {"type": "string"}} for name in names
        ]
    }


def int_param(params: dict[str, Any], name: str, default: int | None = None, minimum: int = 0) -> int | None:
    """An integer parameter, or 400 naming it (TorchServe silently ignores bad values; servekit does not)."""
    value = params.get(name)
    if value is None or value == "":
        return default
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise BadRequestError(f"Parameter {name} must be an integer, got {value!r}")
    return integer(f"Parameter {name}", value, minimum)


def bool_param(params: dict[str, Any], name: str, default: bool) -> bool:
    value = params.get(name)
    if value is None or value == "":
        return default
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("true", "false"):
        return str(value).lower() == "true"
    raise BadRequestError(f"Parameter {name} must be true or false, got {value!r}")


async def request_params(request: Request) -> dict[str, Any]:
    """Query parameters, updated with the fields of a JSON body (``Content-Type: application/json``, any case), which
    is read as leniently as TorchServe reads it (single quotes, unquoted names: see ``servekit.api.lenient``)."""
    params: dict[str, Any] = dict(request.query_params)
    if request.headers.get("content-type", "").split(";")[0].strip().lower() == "application/json":
        try:
            body = lenient.loads((await request.body()).decode() or "{}")
        except (UnicodeDecodeError, ValueError) as exc:
            raise BadRequestError(f"Invalid JSON body: {exc}") from None
        if not isinstance(body, dict):
            raise BadRequestError("The JSON body must be an object")
        params.update(body)
    return params


def create_management_app(registry: ModelRegistry, tokens: TokenStore | None = None) -> FastAPI:
    app = FastAPI(title="servekit management API", openapi_url=API_DESCRIPTION, docs_url="/docs", redoc_url=None)
    install_error_handlers(app)
    settings = registry.settings

    @app.options("/", include_in_schema=False)
    @app.options("/api-description", include_in_schema=False)  # TorchServe: any method
    async def describe_api() -> FrontendJSON:
        return FrontendJSON(app.openapi())

    @app.options("/models/{name}", include_in_schema=False)
    @app.options("/models/{name}/{version}", include_in_schema=False)
    @app.options("/models/{name}/{version}/set-default", include_in_schema=False)
    async def describe_model_api(request: Request) -> FrontendJSON:
        """The description of a model's management routes, as TorchServe answers ``OPTIONS`` there (so a browser's
        CORS preflight of a scale or an unregister gets a 200); 404 for an unknown model or version."""
        model = registry.get(request.path_params["name"], request.path_params.get("version"))
        spec = app.openapi()
        paths = {path: spec["paths"][path] for path in MODEL_PATHS if path in spec["paths"]}
        info = {"title": f"RESTful Management API for: {model.name}", "version": spec["info"]["version"]}
        return FrontendJSON({"openapi": spec["openapi"], "info": info, "paths": paths})

    if tokens is not None:
        app.add_middleware(TokenAuth, store=tokens, kind="management", open_paths=("/token", API_DESCRIPTION, "/docs"))

        @app.api_route("/token", methods=["GET", "POST", "PUT"], openapi_extra=documented("type", required=("type",)))
        async def rotate_token(request: Request) -> Response:
            """The new key is in the key file; the answer is TorchServe's: 200, an empty JSON body (a newline)."""
            assert tokens is not None
            tokens.rotate(request.query_params.get("type", ""), request.headers.get("authorization"))
            return Response(b"\n", media_type="application/json")

    def require_model_api() -> None:
        check_model_api(settings)

    @app.get("/models")
    async def list_models(limit: str = "100", next_page_token: str = "0") -> FrontendJSON:
        # TorchServe's rules: a bad or out-of-range limit means 100, a bad token means the first page
        size = int(limit) if limit.isascii() and limit.isdigit() and 0 < int(limit) <= 100 else 100
        start = int(next_page_token) if next_page_token.isascii() and next_page_token.isdigit() else 0
        return FrontendJSON(model_page(registry, size, start))

    register_params = documented(
        "url",
        "model_name",
        "handler",
        "runtime",
        "batch_size",
        "max_batch_delay",
        "initial_workers",
        "synchronous",
        "response_timeout",
        "startup_timeout",
    )

    @app.post("/models", openapi_extra=register_params)
    async def register(request: Request) -> FrontendJSON:
        require_model_api()
        params = await request_params(request)
        overrides = {
            "batch_size": int_param(params, "batch_size", minimum=1),
            "max_batch_delay": int_param(params, "max_batch_delay"),
            "initial_workers": int_param(params, "initial_workers"),
            "response_timeout": int_param(params, "response_timeout", minimum=1),
            "startup_timeout": int_param(params, "startup_timeout", minimum=1),
        }
        synchronous = bool_param(params, "synchronous", True)
        status, message = await register_model(registry, params, overrides, synchronous)
        return FrontendJSON({"status": message}, status_code=status)

    @app.get("/models/{name}", openapi_extra=documented("customized"))
    async def describe_default(name: str, request: Request) -> FrontendJSON:
        return await describe_one(registry.get(name), request)

    @app.get("/models/{name}/{version}", openapi_extra=documented("customized"))
    async def describe_version(name: str, version: str, request: Request) -> FrontendJSON:
        if version == "all":  # never customized, as in TorchServe
            return FrontendJSON([describe(m) for m in registry.versions(name)])
        return await describe_one(registry.get(name, version), request)

    async def describe_one(model: Model, request: Request) -> FrontendJSON:
        """The describe answer; with ``customized=true``, TorchServe's: the handler's ``describe_handle`` result
        as ``customizedMetadata``, and the handler's status and headers (503 while the model has no worker)."""
        if not bool_param(dict(request.query_params), "customized", False):
            return FrontendJSON([describe(model)])
        request_id = new_request_id()
        answer = await registry.describe_handle(model, WorkerRequest(request_id, header_map(request.scope), ()))
        entry = describe(model)
        if answer.payload.strip():
            entry["customizedMetadata"] = customized_metadata(answer.payload)
        headers = {k: v for k, v in answer.headers.items() if k.lower() not in FRAMING_HEADERS}
        headers |= {"content-type": answer.content_type or "application/json", "x-request-id": request_id}
        return FrontendJSON([entry], answer.status, headers)

    scale_params = documented("min_worker", "max_worker", "synchronous", "model_version")

    @app.put("/models/{name}", openapi_extra=scale_params)
    async def scale_default(name: str, request: Request) -> FrontendJSON:
        return await scale(name, None, request)

    @app.put("/models/{name}/{version}", openapi_extra=scale_params)
    async def scale(name: str, version: str | None, request: Request) -> FrontendJSON:
        params = dict(request.query_params)
        version = version or params.get("model_version") or None
        model = registry.get(name, version)
        min_workers = int_param(params, "min_worker", 1)
        assert min_workers is not None
        max_workers = int_param(params, "max_worker", min_workers)
        assert max_workers is not None
        synchronous = bool_param(params, "synchronous", False)
        await registry.scale(model, min_workers, max_workers, synchronous)
        if not synchronous:
            return FrontendJSON(PROCESSING, status_code=202)
        message = f"Workers scaled to {min_workers} for model: {name}"
        return FrontendJSON({"status": message + (f", version: {version}" if version else "")})

    @app.put("/models/{name}/{version}/set-default")
    async def set_default(name: str, version: str) -> FrontendJSON:
        registry.set_default(name, version)
        return FrontendJSON({"status": f'Default version successfully updated for model "{name}" to "{version}"'})

    @app.delete("/models/{name}")
    async def unregister_default(name: str) -> FrontendJSON:
        return await unregister(name, None)

    @app.delete("/models/{name}/{version}")
    async def unregister(name: str, version: str | None) -> FrontendJSON:
        require_model_api()
        model = await registry.unregister(name, version)
        return FrontendJSON({"status": f'Model "{model.name}" unregistered'})

    # The Open Inference Protocol's model repository extension, under the same auth and enable switch.
    def store_entries() -> dict[str, str]:
        """Model names of the model store's archives and folders, with the store entry holding each."""
        store = settings.model_store
        if store is None or not store.is_dir():
            return {}
        entries = sorted(p for p in store.iterdir() if not p.name.startswith("."))
        usable = [p for p in entries if p.is_dir() or p.name.endswith(ARCHIVE_SUFFIXES)]
        return {re.sub(r"(\.mar|\.model|\.tar\.gz|\.tgz|\.zip)$", "", p.name): p.name for p in usable}

    @app.post("/v2/repository/index")
    async def repository_index() -> JSONResponse:
        loaded = {m.name: m for m in registry.defaults()}
        index = [{"name": n, "version": m.version, "state": "READY" if m.pool.ready else "UNAVAILABLE", "reason": ""}
                 for n, m in loaded.items()]  # fmt: skip
        index += [{"name": n, "state": "UNAVAILABLE", "reason": "unloaded"} for n in store_entries() if n not in loaded]
        return JSONResponse(sorted(index, key=lambda entry: str(entry["name"])))

    @app.post("/v2/repository/models/{name}/load")
    async def repository_load(name: str) -> JSONResponse:
        try:
            require_model_api()
            if any(m.name == name for m in registry.defaults()):
                return JSONResponse({})  # already loaded
            entry = store_entries().get(name)
            if entry is None:
                raise ArchiveNotFoundError(f"Model {name} is not in the model store")
            spec, url, downloaded = await load_spec(settings, {"url": entry, "model_name": name})
            try:
                await registry.register(spec, url, {}, downloaded=downloaded)
            except BaseException:
                spec.remove_staging()
                raise
        except ServekitError as exc:
            return JSONResponse({"error": exc.message}, exc.status_code)
        return JSONResponse({})

    @app.post("/v2/repository/models/{name}/unload")
    async def repository_unload(name: str) -> JSONResponse:
        try:
            require_model_api()
            versions = registry.versions(name)
            default = registry.default_version(name)
            for model in sorted(versions, key=lambda m: m.version == default):  # the default version goes last
                await registry.unregister(name, model.version)
        except ServekitError as exc:
            return JSONResponse({"error": exc.message}, exc.status_code)
        return JSONResponse({})

    return app
