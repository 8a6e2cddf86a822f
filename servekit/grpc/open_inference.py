"""The Open Inference Protocol over gRPC (``inference.GRPCInferenceService``, as Triton and KServe serve it, and the
same methods under TorchServe's name ``org.pytorch.serve.grpc.openinference.GRPCInferenceService``), on the gRPC
inference port, with the models, batchers and workers of the REST API.

``ModelInfer`` takes the path of ``/v2/models/{m}/infer``: the request becomes the same tensors (``servekit.oip``),
checked against the model's declared inputs before anything is queued, and shares the model's queue and batches
with REST requests (``servekit.api.dispatch.submit``). Inputs come as typed ``contents`` or as
``raw_input_contents`` (FP16 and BF16 only raw, as the protocol says); outputs always go back as
``raw_output_contents``, which every client reads. The request's ``timeout`` parameter (microseconds) and the
call's deadline bound the time the request may wait in the queue; a client that cancels drops its queued request.
``ServerLive`` and ``ServerReady`` need no key, as ``/v2/health/*`` does not.
"""

from __future__ import annotations

import json
from typing import Any

import grpc

from servekit.api.dispatch import submit
from servekit.api.response import new_request_id
from servekit.api.v2 import EXTENSIONS, metadata
from servekit.errors import BadRequestError, HandlerError
from servekit.grpc.generated import open_inference_pb2 as pb
from servekit.handler import SERVER_VERSION
from servekit.oip import (
    HEADER_LENGTH,
    V2_CONTENT_TYPE,
    V2_FIELD,
    InferRequest,
    Tensor,
    make_tensor,
    split_response,
    to_worker,
    validate,
)
from servekit.protocol import Field
from servekit.registry import ModelRegistry

Context = grpc.aio.ServicerContext[Any, Any]
OPEN_METHODS = ("ServerLive", "ServerReady")
# The field of InferTensorContents that carries each datatype's values (FP16 and BF16 have none: raw only)
CONTENTS = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


class OpenInference:
    """The methods of ``GRPCInferenceService`` (``servekit.grpc.port`` serves them)."""

    def __init__(self, registry: ModelRegistry) -> None:
        self.registry = registry

    async def ServerLive(self, request: pb.ServerLiveRequest, context: Context) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: Context) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.registry.healthy())

    async def ModelReady(self, request: pb.ModelReadyRequest, context: Context) -> pb.ModelReadyResponse:
        model = self.registry.get(request.name, request.version or None)
        return pb.ModelReadyResponse(ready=model.pool.ready > 0)

    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: Context) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name="servekit", version=SERVER_VERSION, extensions=EXTENSIONS)

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Context) -> pb.ModelMetadataResponse:
        model = self.registry.get(request.name, request.version or None)
        return pb.ModelMetadataResponse(**metadata(model, [m.version for m in self.registry.versions(model.name)]))

    async def ModelInfer(self, request: pb.ModelInferRequest, context: Context) -> pb.ModelInferResponse:
        model = self.registry.get(request.model_name, request.model_version or None)

        async def read() -> tuple[tuple[Field, ...], float | None]:
            parsed = infer_request(request)
            validate(parsed, model.inputs, model.outputs)
            budgets = [b for b in (parsed.timeout_s, context.time_remaining()) if b is not None]
            worker_request = to_worker(parsed, model.name, model.version)
            return (Field(V2_FIELD, V2_CONTENT_TYPE, worker_request),), min(budgets, default=None)

        answer = await submit(model, new_request_id(), read, {}, request.model_version or "default")
        if answer.status >= 400:
            raise _failure(answer.payload, answer.status)
        length = answer.headers.get(HEADER_LENGTH)
        header, blobs = split_response(answer.payload, int(length) if length is not None else None)
        response = pb.ModelInferResponse(
            model_name=header["model_name"], model_version=header["model_version"], id=header.get("id") or ""
        )
        for entry, blob in zip(header["outputs"], blobs, strict=True):
            response.outputs.add(name=entry["name"], datatype=entry["datatype"], shape=entry["shape"])
            response.raw_output_contents.append(blob if blob is not None else _raw(entry))
        return response


def infer_request(request: pb.ModelInferRequest) -> InferRequest:
    """A gRPC ``ModelInferRequest`` as the v2 request the HTTP route parses; ``BadRequestError`` naming what is
    wrong. Every output is asked for as binary data (``raw_output_contents``)."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise BadRequestError(f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs")
    if not request.inputs:
        raise BadRequestError("The inference request needs at least one input")
    inputs = []
    for i, tensor in enumerate(request.inputs):
        inputs.append(_input(tensor, raw[i] if raw else None))
    timeout = request.parameters.get("timeout")
    timeout_us = timeout.int64_param if timeout is not None and timeout.HasField("int64_param") else 0
    return InferRequest(
        request.id or None,
        tuple(inputs),
        tuple((output.name, True) for output in request.outputs),
        True,
        timeout_us / 1e6 if timeout_us > 0 else None,
    )


def _input(tensor: pb.ModelInferRequest.InferInputTensor, raw: bytes | None) -> Tensor:
    shape = list(tensor.shape)
    if raw is not None:
        return make_tensor(tensor.name, tensor.datatype, shape, raw=raw)
    field = CONTENTS.get(tensor.datatype)
    if field is None and tensor.datatype in ("FP16", "BF16"):
        raise BadRequestError(f"input {tensor.name}: {tensor.datatype} data must come in raw_input_contents")
    values = list(getattr(tensor.contents, field)) if field is not None else []
    return make_tensor(tensor.name, tensor.datatype, shape, values=values)


def _raw(entry: dict[str, Any]) -> bytes:
    """An output the worker gave as JSON data, as raw bytes (every output is asked for as binary, so only a handler
    that wrote its own v2 answer gets here)."""
    return make_tensor(entry["name"], entry["datatype"], entry["shape"], values=list(entry["data"])).data


def _failure(payload: bytes, status: int) -> HandlerError:
    """A v2 error answer (``{"error": message}``) as the error that ends the call with its status's code."""
    try:
        body = json.loads(payload)
    except ValueError:
        body = None
    message = body.get("error") if isinstance(body, dict) else None
    return HandlerError(str(message) if message is not None else payload.decode("utf-8", "replace")[:4096], status)
