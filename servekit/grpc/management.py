"""TorchServe's gRPC management API (``org.pytorch.serve.grpc.management.ManagementAPIsService``), on the registry the
REST management API changes, with its rules (``servekit.api.management``): each answer's ``msg`` is the ``status``
text REST answers, or for ``DescribeModel`` and ``ListModels`` the JSON REST answers, indented as TorchServe's.

A numeric field left at 0 means "not given", as in TorchServe: ``RegisterModel`` then takes the model config's
value or the default (``initial_workers``: ``default_workers_per_model`` when configured, else none);
``ScaleWorker``'s ``min_worker`` is 1 and ``max_worker`` is ``min_worker``; ``ListModels``' ``limit`` is 100.
``RegisterModel`` and ``UnregisterModel`` need ``enable_model_api`` (else ``PERMISSION_DENIED``, as in TorchServe).
"""

from __future__ import annotations

import json
from typing import Any

import grpc

from servekit.api.description import customized_metadata, describe, model_page
from servekit.api.registration import PROCESSING, check_model_api, register_model
from servekit.api.response import new_request_id
from servekit.errors import BadRequestError
from servekit.grpc.generated.management_pb2 import (
    DescribeModelRequest,
    ListModelsRequest,
    ManagementResponse,
    RegisterModelRequest,
    ScaleWorkerRequest,
    SetDefaultRequest,
    UnregisterModelRequest,
)
from servekit.protocol import Request as WorkerRequest
from servekit.registry import ModelRegistry

Context = grpc.aio.ServicerContext[Any, Any]
MAX_PAGE = 100


class ManagementAPIs:
    """The methods of ``ManagementAPIsService`` (``servekit.grpc.port`` serves them)."""

    def __init__(self, registry: ModelRegistry) -> None:
        self.registry = registry

    async def DescribeModel(self, request: DescribeModelRequest, context: Context) -> ManagementResponse:
        """REST's describe; ``customized`` adds the handler's ``describe_handle`` answer (not for ``all``)."""
        name = _required(request.model_name, "model_name")
        if request.model_version == "all":
            return _json([describe(m) for m in self.registry.versions(name)])
        model = self.registry.get(name, request.model_version or None)
        entry = describe(model)
        if request.customized:
            answer = await self.registry.describe_handle(model, WorkerRequest(new_request_id(), {}, ()))
            if answer.payload.strip():
                entry["customizedMetadata"] = customized_metadata(answer.payload)
        return _json([entry])

    async def ListModels(self, request: ListModelsRequest, context: Context) -> ManagementResponse:
        size = request.limit if 0 < request.limit <= MAX_PAGE else MAX_PAGE
        return _json(model_page(self.registry, size, max(0, request.next_page_token)))

    async def RegisterModel(self, request: RegisterModelRequest, context: Context) -> ManagementResponse:
        params = {
            "url": request.url or None,
            "model_name": request.model_name or None,
            "handler": request.handler or None,
            "runtime": request.runtime or None,
        }
        given = (
            ("batch_size", request.batch_size),
            ("max_batch_delay", request.max_batch_delay),
            ("initial_workers", request.initial_workers),
            ("response_timeout", request.response_timeout),
            ("startup_timeout", request.startup_timeout),
        )
        overrides = {key: value if value > 0 else None for key, value in given}
        _, message = await register_model(self.registry, params, overrides, request.synchronous)
        return ManagementResponse(msg=message)

    async def ScaleWorker(self, request: ScaleWorkerRequest, context: Context) -> ManagementResponse:
        name = _required(request.model_name, "model_name")
        version = request.model_version or None
        model = self.registry.get(name, version)
        min_workers = request.min_worker if request.min_worker > 0 else 1
        max_workers = request.max_worker if request.max_worker > 0 else min_workers
        await self.registry.scale(model, min_workers, max_workers, request.synchronous)
        if not request.synchronous:
            return ManagementResponse(msg=PROCESSING["status"])
        message = f"Workers scaled to {min_workers} for model: {name}"
        return ManagementResponse(msg=message + (f", version: {version}" if version else ""))

    async def SetDefault(self, request: SetDefaultRequest, context: Context) -> ManagementResponse:
        name = _required(request.model_name, "model_name")
        version = _required(request.model_version, "model_version")
        self.registry.set_default(name, version)
        return ManagementResponse(msg=f'Default version successfully updated for model "{name}" to "{version}"')

    async def UnregisterModel(self, request: UnregisterModelRequest, context: Context) -> ManagementResponse:
        check_model_api(self.registry.settings)
        model = await self.registry.unregister(
            _required(request.model_name, "model_name"), request.model_version or None
        )
        return ManagementResponse(msg=f'Model "{model.name}" unregistered')


def _required(value: str, name: str) -> str:
    if not value:
        raise BadRequestError(f"Parameter {name} is required.")
    return value


def _json(value: Any) -> ManagementResponse:
    """``value`` as TorchServe's answers print JSON (Gson's pretty printing: two-space indents, no escapes)."""
    return ManagementResponse(msg=json.dumps(value, indent=2, ensure_ascii=False))
