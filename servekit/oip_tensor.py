"""The worker's half of the Open Inference Protocol (KServe v2) codec: a request as ``servekit.oip.to_worker`` wrote it,
as torch tensors (``from_worker_payload``, ``as_tensor``), and a model's output tensors as each request's v2 response
body (``Outputs.response``), JSON or with the binary tensor extension.

Runs in the worker process (``servekit.tensors``); torch is imported inside the functions that need it. Never imports
asyncio or fastapi.
"""

from __future__ import annotations

import ctypes
import functools
import itertools
import json
import math
import struct
from typing import Any

import orjson

from servekit.oip import HEADER_LENGTH, as_bytes, pack_bytes


@functools.cache
def _torch_types() -> dict[str, Any]:
    import torch

    return {
        "BOOL": torch.bool, "UINT8": torch.uint8, "UINT16": torch.uint16, "UINT32": torch.uint32,
        "UINT64": torch.uint64, "INT8": torch.int8, "INT16": torch.int16, "INT32": torch.int32, "INT64": torch.int64,
        "FP16": torch.float16, "FP32": torch.float32, "FP64": torch.float64, "BF16": torch.bfloat16,
    }  # fmt: skip


@functools.cache
def _datatypes() -> dict[Any, str]:
    return {v: k for k, v in _torch_types().items()}


def _unpack_bytes(data: bytes) -> list[bytes]:
    items, offset = [], 0
    while offset < len(data):
        (length,) = struct.unpack_from("<I", data, offset)
        items.append(data[offset + 4 : offset + 4 + length])
        offset += 4 + length
    return items


def from_worker_payload(payload: bytes) -> tuple[dict[str, Any], dict[str, tuple[str, list[int], bytes]]]:
    """The worker's view of a v2 request: its header, and its inputs by name as (datatype, shape, raw bytes), which
    ``as_tensor`` turns into a tensor, for one request or for the rows of several joined."""
    (head_len,) = struct.unpack_from(">I", payload)
    header = orjson.loads(payload[4 : 4 + head_len])
    offset = 4 + head_len
    inputs = {}
    for name, datatype, shape, size in header["inputs"]:
        inputs[name] = (datatype, shape, payload[offset : offset + size])
        offset += size
    return header, inputs


def as_tensor(datatype: str, shape: list[int], data: bytes) -> Any:
    """Little-endian input bytes as a torch tensor of ``shape`` (BYTES: a list of bytes)."""
    import torch

    if datatype == "BYTES":
        return _unpack_bytes(data)
    if math.prod(shape) == 0:
        return torch.empty(shape, dtype=_torch_types()[datatype])
    return torch.frombuffer(bytearray(data), dtype=_torch_types()[datatype]).reshape(shape)


def _raw_bytes(tensor: Any) -> bytes:
    tensor = tensor.detach().cpu().contiguous()
    return ctypes.string_at(tensor.data_ptr(), tensor.numel() * tensor.element_size())


class _Output:
    """One output of a batch, cut into each request's rows on demand: converted once for the whole batch (to a list
    for JSON, to bytes for the binary extension), however many requests share it."""

    def __init__(self, value: Any, starts: list[int] | None) -> None:
        self.value, self.starts = value, starts  # starts: each request's first row, then the total; None: one request
        self.is_list = isinstance(value, list)  # BYTES
        self.datatype = "BYTES" if self.is_list else _datatypes()[value.dtype]
        if starts is not None and (len(value) if self.is_list else value.shape[0] if value.dim() else -1) != starts[-1]:
            raise ValueError(f"an output has a first dimension other than the batch's {starts[-1]} rows")
        self.finite = True  # orjson writes NaN and infinities as null: Python's json writes them as clients expect
        self._rows: list[Any] | None = None
        self._raw: bytes | None = None

    def _part(self, whole: Any, i: int) -> Any:
        return whole if self.starts is None else whole[self.starts[i] : self.starts[i + 1]]

    def shape(self, i: int) -> list[int]:
        if self.is_list:
            return [len(self._part(self.value, i))]
        if self.starts is None:
            return list(self.value.shape)
        return [self.starts[i + 1] - self.starts[i], *self.value.shape[1:]]

    def data(self, i: int) -> list[Any]:
        """Request ``i``'s values, flat, for JSON."""
        if self.is_list:
            return [as_bytes(v).decode(errors="replace") for v in self._part(self.value, i)]
        if self._rows is None:
            if self.starts is None:
                self._rows = self.value.reshape(-1).tolist()
            else:  # a list per row
                self._rows = (self.value.flatten(1) if self.value.dim() > 1 else self.value.unsqueeze(1)).tolist()
            if self.value.is_floating_point():
                self.finite = bool(self.value.isfinite().all())
        if self.starts is None:
            return self._rows
        return [x for row in self._part(self._rows, i) for x in row]

    def raw(self, i: int) -> bytes:
        """Request ``i``'s values as little-endian bytes (BYTES: length-prefixed)."""
        if self.is_list:
            return pack_bytes([as_bytes(v) for v in self._part(self.value, i)])
        if self._raw is None:
            self._raw = _raw_bytes(self.value)
        if self.starts is None:
            return self._raw
        row = len(self._raw) // self.starts[-1] if self.starts[-1] else 0
        return self._raw[self.starts[i] * row : self.starts[i + 1] * row]


class Outputs:
    """The outputs of a model run over the rows of one request, or of several joined (``sizes``: each one's rows),
    answered request by request (``response``)."""

    def __init__(self, outputs: dict[str, Any], sizes: list[int] | None) -> None:
        self.outputs = outputs
        self.starts = list(itertools.accumulate(sizes, initial=0)) if sizes is not None else None
        self._views: dict[str, _Output] = {}

    def response(self, header: dict[str, Any], i: int) -> tuple[bytes, dict[str, str]]:
        """Request ``i``'s HTTP body and headers: JSON, or JSON + binary for outputs that ask for it; ``ValueError``
        if an output does not have the batch's rows."""
        requested = header["outputs"] or [[name, None] for name in self.outputs]
        if header.get("predictions"):  # KServe v1: the first output, one item per instance (NaN as null)
            view = self._view(requested[0][0])
            data = view.data(i)
            for size in reversed(view.shape(i)[1:]):
                data = [data[j : j + size] for j in range(0, len(data), size)]
            return orjson.dumps({"predictions": data}), {"content-type": "application/json"}
        entries, blobs, finite = [], [], True
        for name, flag in requested:
            view = self._view(name)
            binary = (header["binary_output"] if flag is None else flag) or view.datatype == "BF16"  # BF16: no JSON
            entry: dict[str, Any] = {"name": name, "datatype": view.datatype, "shape": view.shape(i)}
            if binary:
                raw = view.raw(i)
                entry["parameters"] = {"binary_data_size": len(raw)}
                blobs.append(raw)
            else:
                entry["data"] = view.data(i)
                finite = finite and view.finite
            entries.append(entry)
        body: dict[str, Any] = {"model_name": header["model_name"], "model_version": header["model_version"]}
        if header.get("id") is not None:
            body["id"] = header["id"]
        body["outputs"] = entries
        head = orjson.dumps(body) if finite else json.dumps(body).encode()
        if not blobs:
            return head, {"content-type": "application/json"}
        return b"".join([head, *blobs]), {"content-type": "application/octet-stream", HEADER_LENGTH: str(len(head))}

    def _view(self, name: str) -> _Output:
        view = self._views.get(name)
        if view is None:
            view = self._views[name] = _Output(self.outputs[name], self.starts)
        return view
