"""The Open Inference Protocol (KServe v2) codec: tensors as JSON or in the binary tensor extension.

A request reaches the worker in one of two fields. An HTTP body (v2 ``infer`` or KServe v1 ``:predict``) travels as
the client sent it (``BODY_FIELD``, ``body_value``), and the worker parses and checks it (``worker_request``: a bad
one is answered 400 there, alone): the front end, a fast model's bottleneck, spends no time on the tensors. gRPC's
requests, parsed by protobuf in the front end, travel as one self-describing blob (``V2_FIELD``, ``to_worker``): a
JSON header and the raw little-endian tensor bytes, so binary payloads are never re-encoded as JSON. The worker
turns that into torch tensors and writes the response body itself (``servekit.oip_tensor``, the codec's other half).
Standard library and orjson only; never imports torch.
"""

from __future__ import annotations

import contextlib
import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from servekit.errors import BadRequestError

V2_CONTENT_TYPE = "application/x-servekit-v2"  # how a v2 request travels to the worker (either field)
V2_FIELD = "v2"  # a request parsed and checked (``to_worker``)
BODY_FIELD = "v2 body"  # an HTTP body as the client sent it, parsed and checked in the worker (``body_value``)
HEADER_LENGTH = "inference-header-content-length"
MAX_ELEMENTS = 2**40

# datatype -> (struct code for JSON data, bytes per element); BYTES is length-prefixed, BF16 packed by hand
DATATYPES: dict[str, tuple[str, int]] = {
    "BOOL": ("?", 1),
    "UINT8": ("B", 1),
    "UINT16": ("H", 2),
    "UINT32": ("I", 4),
    "UINT64": ("Q", 8),
    "INT8": ("b", 1),
    "INT16": ("h", 2),
    "INT32": ("i", 4),
    "INT64": ("q", 8),
    "FP16": ("e", 2),
    "FP32": ("f", 4),
    "FP64": ("d", 8),
    "BF16": ("", 2),
    "BYTES": ("", 0),
}


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """An input or output the model declares; ``-1`` marks a variable dimension."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


def specs_from_config(config: dict[str, Any], key: str) -> tuple[TensorSpec, ...]:
    """``inputs``/``outputs`` of a model-config YAML: ``[{name, datatype, shape}]``; ``ValueError`` if malformed."""
    specs = []
    for item in config.get(key) or []:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise ValueError(f"{key}: each entry needs a name")
        datatype = str(item.get("datatype", "FP32")).upper()
        shape = item.get("shape", [-1])
        if (
            datatype not in DATATYPES
            or not isinstance(shape, list)
            or not all(isinstance(d, int) and d >= -1 for d in shape)
        ):
            raise ValueError(f"{key}: {item['name']} needs a known datatype and a shape of integers >= -1")
        specs.append(TensorSpec(item["name"], datatype, tuple(shape)))
    return tuple(specs)


# Tensor and InferRequest are made for every v2 request and never changed after: not frozen, whose __init__ costs
# half a microsecond more each (benchmarks/RESULTS.md, ninth session).
@dataclass(slots=True)
class Tensor:
    name: str
    datatype: str
    shape: tuple[int, ...]
    data: bytes  # little-endian, row-major; BYTES elements are 4-byte length + bytes


@dataclass(slots=True)
class InferRequest:
    id: str | None
    inputs: tuple[Tensor, ...]
    outputs: tuple[tuple[str, bool | None], ...]  # requested outputs, each with its binary_data flag if given
    binary_output: bool  # the request's binary_data_output
    timeout_s: float | None  # the reserved "timeout" parameter (microseconds) as a deadline


def _elements(name: str, shape: Sequence[Any]) -> int:
    count = 1
    for dim in shape:
        if not isinstance(dim, int) or isinstance(dim, bool) or dim < 0:
            raise BadRequestError(f"input {name}: shape must be non-negative integers, got {list(shape)}")
        count *= dim
        if count > MAX_ELEMENTS:
            raise BadRequestError(f"input {name}: shape {list(shape)} has too many elements")
    return count


def flatten(data: Any) -> list[Any]:
    """Nested lists of values as one flat list, in row-major order."""
    flat: list[Any] = []
    stack = [iter([data])]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            flat.append(item)
        else:
            stack.pop()
    return flat


def _pack(name: str, datatype: str, values: list[Any]) -> bytes:
    """JSON values as the binary layout of ``datatype``."""
    try:
        if datatype == "BYTES":
            return pack_bytes([as_bytes(v) for v in values])
        if datatype == "BF16":
            return b"".join(struct.pack("<f", float(v))[2:] for v in values)
        code = DATATYPES[datatype][0]
        if code not in "efd?" and any(isinstance(v, float | bool) for v in values):
            raise TypeError("integers expected")
        return struct.pack(f"<{len(values)}{code}", *values)
    except (struct.error, TypeError, ValueError, OverflowError) as exc:
        raise BadRequestError(f"input {name}: data does not fit datatype {datatype} ({exc})") from None


def as_bytes(value: Any) -> bytes:
    """A BYTES element given as ``str`` (UTF-8) or bytes-like, as bytes."""
    return value.encode() if isinstance(value, str) else bytes(value)


def pack_bytes(items: list[bytes]) -> bytes:
    """BYTES elements in the protocol's layout: each a 4-byte little-endian length, then its bytes."""
    return b"".join(struct.pack("<I", len(i)) + i for i in items)


def _check_bytes_layout(name: str, data: bytes | memoryview, count: int) -> None:
    offset = 0
    for _ in range(count):
        if offset + 4 > len(data):
            raise BadRequestError(f"input {name}: BYTES data ends inside an element length")
        (length,) = struct.unpack_from("<I", data, offset)
        offset += 4 + length
    if offset != len(data):
        raise BadRequestError(f"input {name}: BYTES data has {len(data)} bytes, its {count} elements use {offset}")


def loads(document: bytes | memoryview) -> Any:
    """JSON by orjson (several times faster), or by Python's json for what orjson refuses and Python's json takes
    (NaN, Infinity, integers past 64 bits); ``ValueError`` for text that is not JSON."""
    try:
        return orjson.loads(document)
    except orjson.JSONDecodeError:
        return json.loads(bytes(document))


def make_tensor(
    name: str, datatype: Any, shape: Any, *, raw: bytes | None = None, values: list[Any] | None = None
) -> Tensor:
    """An input from its raw little-endian bytes or from its values (flat, in row-major order), checked against its
    datatype and shape; ``BadRequestError`` naming what is wrong. Used for JSON and binary v2 bodies and for gRPC."""
    if datatype not in DATATYPES:
        raise BadRequestError(f"input {name}: unknown datatype {datatype!r}")
    if not isinstance(shape, list):
        raise BadRequestError(f"input {name}: 'shape' must be a list")
    count = _elements(name, shape)
    if raw is None:
        values = values or []
        if len(values) != count:
            raise BadRequestError(f"input {name}: shape {shape} needs {count} elements, got {len(values)}")
        raw = _pack(name, datatype, values)
    if datatype == "BYTES":
        _check_bytes_layout(name, raw, count)
    elif len(raw) != count * DATATYPES[datatype][1]:
        needed = count * DATATYPES[datatype][1]
        raise BadRequestError(f"input {name}: shape {shape} of {datatype} needs {needed} bytes, got {len(raw)}")
    return Tensor(name, datatype, tuple(shape), raw)


def json_tensor(name: str, datatype: Any, shape: Any, data: Any) -> Tensor:
    """An input given as JSON ``data``: nested lists in row-major order, or one flat list (as clients mostly send
    it, taken as it is: flattening it again costs a microsecond and a half per request). A flat list that does not
    fit is checked again the long way, so that the error is the same either way."""
    if isinstance(data, list) and data and not isinstance(data[0], list):
        with contextlib.suppress(BadRequestError):
            return make_tensor(name, datatype, shape, values=data)
    return make_tensor(name, datatype, shape, values=flatten(data))


def parse_request(body: bytes, header_length: int | None) -> InferRequest:
    """A v2 inference request (JSON, or JSON + binary tensors); ``BadRequestError`` naming what is wrong."""
    if header_length is not None and not 0 < header_length <= len(body):
        raise BadRequestError(f"{HEADER_LENGTH} is {header_length}, the body has {len(body)} bytes")
    split = len(body) if header_length is None else header_length
    try:
        header = loads(body[:split])
    except (ValueError, RecursionError) as exc:
        raise BadRequestError(f"Invalid JSON in inference request: {str(exc)[:200]}") from None
    if not isinstance(header, dict) or not isinstance(header.get("inputs"), list) or not header["inputs"]:
        raise BadRequestError("The inference request needs a non-empty 'inputs' list")
    binary = memoryview(body)[split:]
    offset = 0
    inputs = []
    for item in header["inputs"]:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise BadRequestError("Each input needs a 'name'")
        name, datatype, shape = item["name"], item.get("datatype"), item.get("shape")
        params = item.get("parameters") or {}
        if not isinstance(params, dict):
            raise BadRequestError(f"input {name}: 'parameters' must be an object")
        if "binary_data_size" in params:
            size = params["binary_data_size"]
            if not isinstance(size, int) or size < 0 or offset + size > len(binary):
                raise BadRequestError(f"input {name}: binary_data_size {size!r} runs past the end of the body")
            inputs.append(make_tensor(name, datatype, shape, raw=bytes(binary[offset : offset + size])))
            offset += size
        elif "data" in item:
            inputs.append(json_tensor(name, datatype, shape, item["data"]))
        else:
            raise BadRequestError(f"input {name}: needs 'data' or a binary_data_size parameter")
    if offset != len(binary):
        raise BadRequestError(f"The body has {len(binary) - offset} bytes of binary data that no input claims")
    outputs = []
    for item in header.get("outputs") or []:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise BadRequestError("Each requested output needs a 'name'")
        flag = (item.get("parameters") or {}).get("binary_data")
        outputs.append((item["name"], None if flag is None else bool(flag)))
    params = header.get("parameters") or {}
    if not isinstance(params, dict):
        raise BadRequestError("'parameters' must be an object")
    timeout_s = _timeout_s(params)
    request_id = header.get("id")
    return InferRequest(
        None if request_id is None else str(request_id),
        tuple(inputs),
        tuple(outputs),
        bool(params.get("binary_data_output", False)),
        timeout_s,
    )


def _timeout_s(params: dict[str, Any]) -> float | None:
    """The reserved ``timeout`` parameter (microseconds) as a queueing deadline in seconds, if valid."""
    timeout = params.get("timeout")
    return timeout / 1e6 if isinstance(timeout, int | float) and timeout > 0 else None


def timeout_of(body: bytes, header_length: int | None) -> float | None:
    """The front end's one look into a v2 body it does not parse: the ``timeout`` parameter, read only when the
    JSON names it; ``None`` for a body that is not what ``parse_request`` takes (the worker answers that 400)."""
    head = body if header_length is None else body[:header_length]
    if b'"timeout"' not in head:
        return None
    try:
        document = loads(head)
    except (ValueError, RecursionError):
        return None
    params = document.get("parameters") if isinstance(document, dict) else None
    return _timeout_s(params) if isinstance(params, dict) else None


def instances_request(spec: TensorSpec | None, body: bytes) -> InferRequest:
    """A KServe v1 ``{"instances": [...]}`` body as a v2 request on the model's first input (``spec``, if declared)."""
    try:
        document = loads(body)
    except (ValueError, RecursionError) as exc:
        raise BadRequestError(f"Invalid JSON: {str(exc)[:200]}") from None
    instances = document.get("instances") if isinstance(document, dict) else None
    if not isinstance(instances, list) or not instances:
        raise BadRequestError("The request needs a non-empty 'instances' list")
    shape: list[int] = []
    level: Any = instances
    while isinstance(level, list):
        shape.append(len(level))
        level = level[0] if level else None
    tensor = json_tensor(spec.name if spec else "INPUT__0", spec.datatype if spec else "FP32", shape, instances)
    return InferRequest(None, (tensor,), (), False, None)


def body_value(body: bytes, header_length: int | None, model: tuple[str, str], predictions: bool) -> bytes:
    """A ``BODY_FIELD``'s value: the model's name and version, the body's JSON length (``None``: all of it) and
    whether it is KServe v1's ``instances``, then the body."""
    head = orjson.dumps([*model, header_length, predictions])
    return b"".join((struct.pack(">I", len(head)), head, body))


WorkerRequest = tuple[dict[str, Any], dict[str, tuple[str, list[int], bytes]]]


def worker_request(value: bytes, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec]) -> WorkerRequest:
    """The worker's side of ``body_value``: the body parsed and checked against the model's metadata, in the form
    ``servekit.oip_tensor.from_worker_payload`` reads from ``to_worker``'s blob (its header, and its inputs by name);
    ``BadRequestError`` naming what is wrong."""
    (size,) = struct.unpack_from(">I", value)
    name, version, header_length, predictions = orjson.loads(value[4 : 4 + size])
    body = value[4 + size :]
    if predictions:
        request = instances_request(inputs[0] if inputs else None, body)
    else:
        request = parse_request(body, header_length)
    validate(request, inputs, outputs)
    header = worker_header(request, name, version, predictions)
    return header, {t.name: (t.datatype, list(t.shape), t.data) for t in request.inputs}


def validate(request: InferRequest, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec]) -> None:
    """Check names, datatypes and shapes against the model's metadata (nothing to check if it declares none)."""
    if inputs:
        expected = {spec.name: spec for spec in inputs}
        given = {tensor.name for tensor in request.inputs}
        if missing := sorted(set(expected) - given):
            raise BadRequestError(f"missing input(s) {missing}; the model expects {sorted(expected)}")
        for tensor in request.inputs:
            spec = expected.get(tensor.name)
            if spec is None:
                raise BadRequestError(f"unexpected input {tensor.name}; the model expects {sorted(expected)}")
            if tensor.datatype != spec.datatype:
                raise BadRequestError(f"input {tensor.name}: expected datatype {spec.datatype}, got {tensor.datatype}")
            if len(tensor.shape) != len(spec.shape) or any(
                want not in (-1, got) for want, got in zip(spec.shape, tensor.shape, strict=True)
            ):
                raise BadRequestError(
                    f"input {tensor.name}: expected shape {list(spec.shape)}, got {list(tensor.shape)}"
                )
    if outputs:
        names = {spec.name for spec in outputs}
        for name, _ in request.outputs:
            if name not in names:
                raise BadRequestError(f"unknown output {name}; the model has {sorted(names)}")


def to_worker(request: InferRequest, model_name: str, model_version: str, predictions: bool = False) -> bytes:
    """The request as the worker receives it: ``>I`` header length, JSON header (``worker_header``), tensor bytes."""
    head = orjson.dumps(worker_header(request, model_name, model_version, predictions))
    return b"".join([struct.pack(">I", len(head)), head, *(t.data for t in request.inputs)])


def worker_header(request: InferRequest, model_name: str, model_version: str, predictions: bool) -> dict[str, Any]:
    """What the worker needs of a request besides its tensors. With ``predictions`` the worker answers KServe v1's
    ``{"predictions": ...}`` instead of a v2 response (``Outputs.response``)."""
    header = {
        "id": request.id,
        "model_name": model_name,
        "model_version": model_version,
        "inputs": [[t.name, t.datatype, list(t.shape), len(t.data)] for t in request.inputs],
        "outputs": [list(o) for o in request.outputs],
        "binary_output": request.binary_output,
    }
    if predictions:
        header["predictions"] = True
    return header


def split_response(body: bytes, header_length: int | None) -> tuple[dict[str, Any], list[bytes | None]]:
    """A v2 response body (``encode_response``'s): its JSON header, and each output's binary data in the order of
    its ``outputs`` (``None`` for an output given as JSON ``data``)."""
    split = len(body) if header_length is None else header_length
    header = orjson.loads(body[:split])
    offset, blobs = split, []
    for entry in header["outputs"]:
        size = (entry.get("parameters") or {}).get("binary_data_size")
        blobs.append(None if size is None else body[offset : offset + size])
        offset += size or 0
    return header, blobs
