"""``tensor``: the handler of an archive that names none. Tensors in, tensors out, for a single-input model.

Per request one input tensor, its first dimension the batch (the samples of that request):

- JSON (any content type): a nested array, or ``{"data": array, "dtype": name}`` with ``dtype`` one of ``DTYPES``
  (default: the model config's input datatype, else ``float32``). The answer is the model's output as JSON: a
  nested array, a list of them for a tuple of outputs, an object of them for a dict.
- ``torch.save`` bytes of one tensor (a body starting as a zip file does), read with ``torch.load(weights_only=True)``.
  The answer is the output saved the same way (``application/octet-stream``).

When the model config declares its ``inputs`` (``[{name, datatype, shape}]``, as for the Open Inference Protocol),
the first one is enforced: a tensor of another datatype, rank or fixed dimension is a 400 naming what was expected.
Requests of two dimensions or more with the same dtype and trailing dimensions are concatenated along dimension 0,
run through the model once and split back; the others run alone.

Runs in the worker process; never imports asyncio or fastapi.
"""

from __future__ import annotations

import io
import json
from typing import Any

import torch

from servekit.handler import Context, InvalidInput

from .base_handler import BaseHandler, json_kind

DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
# The Open Inference Protocol's datatype names, as the model config writes them
V2_DTYPES = {"FP32": "float32", "FP64": "float64", "FP16": "float16", "BF16": "bfloat16", "INT64": "int64"}
V2_DTYPES |= {"INT32": "int32", "INT16": "int16", "INT8": "int8", "UINT8": "uint8", "BOOL": "bool"}
ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format is a zip file


class TensorHandler(BaseHandler):
    """One tensor per request in; the model's output for it out, in the form it came (JSON or ``torch.save``)."""

    def initialize(self, context: Context) -> None:
        super().initialize(context)
        self.input_spec = input_spec(context.model_yaml_config)

    def preprocess(self, data: list[Any]) -> list[tuple[torch.Tensor, bool]]:
        """Per request: its tensor, and whether it came as ``torch.save`` bytes."""
        return [self.tensor(row) for row in data]

    def inference(self, data: list[tuple[torch.Tensor, bool]], *args: Any, **kwargs: Any) -> list[tuple[Any, bool]]:
        groups: dict[Any, list[int]] = {}
        for i, (tensor, _) in enumerate(data):
            key = (tensor.dtype, tuple(tensor.shape[1:])) if tensor.dim() >= 2 else i
            groups.setdefault(key, []).append(i)
        run = super().inference
        outputs: dict[int, Any] = {}
        for members in groups.values():
            tensors = [data[i][0].to(self.device) for i in members]
            parts = None
            if len(tensors) > 1:
                parts = split(run(torch.cat(tensors), *args, **kwargs), [len(t) for t in tensors])
            if parts is None:  # alone, or the output has no batch dimension to split along
                parts = [run(tensor, *args, **kwargs) for tensor in tensors]
            outputs.update(zip(members, parts, strict=True))
        return [(outputs[i], binary) for i, (_, binary) in enumerate(data)]

    def postprocess(self, data: list[tuple[Any, bool]]) -> list[Any]:
        return [saved(output) if binary else to_json(output) for output, binary in data]

    def tensor(self, row: Any) -> tuple[torch.Tensor, bool]:
        value = row.get("data") if isinstance(row, dict) else None
        if value is None and isinstance(row, dict):
            value = row.get("body")
        if isinstance(value, bytes | bytearray) and value[:4] == ZIP_MAGIC:
            tensor = load_tensor(value)
            self._check(tensor, None)
            return tensor, True
        if isinstance(value, bytes | bytearray | str):
            try:
                value = json.loads(value)
            except (ValueError, RecursionError):
                raise InvalidInput("The body is neither JSON nor a tensor saved with torch.save") from None
        dtype_name = None
        if isinstance(value, dict):
            if "data" not in value:
                raise InvalidInput('Expected a JSON array or {"data": array, "dtype": name}')
            value, dtype_name = value["data"], value.get("dtype")
        if not isinstance(value, list):
            kind = "no body" if value is None else f"a JSON {json_kind(value)}"
            raise InvalidInput(f"Expected a JSON array (batch dimension first), got {kind}")
        tensor = from_json(value, dtype_name or (self.input_spec[1] if self.input_spec else "float32"))
        self._check(tensor, dtype_name)
        return tensor, False

    def _check(self, tensor: torch.Tensor, dtype_name: str | None) -> None:
        """Refuse a tensor that does not match the model config's first input (when the config declares one)."""
        if tensor.dim() == 0 or tensor.numel() == 0:
            raise InvalidInput(f"Expected a non-empty tensor, batch dimension first; got {shape(tensor)}")
        if self.input_spec is None:
            return
        name, expected_dtype, expected_shape = self.input_spec
        if DTYPES[expected_dtype] != tensor.dtype:
            got = dtype_name or str(tensor.dtype).removeprefix("torch.")
            raise InvalidInput(f"Input {name} is {expected_dtype}, got {got}")
        got_shape = shape(tensor)
        fits = len(got_shape) == len(expected_shape)
        if not fits or any(e not in (-1, g) for e, g in zip(expected_shape, got_shape, strict=True)):
            raise InvalidInput(f"Input {name} has shape {expected_shape}, got {got_shape}")


def input_spec(config: dict[str, Any]) -> tuple[str, str, list[int]] | None:
    """The first input the model config declares: name, dtype name and shape (-1 for any size); None if none."""
    inputs = config.get("inputs")
    if not inputs:
        return None
    first = inputs[0] if isinstance(inputs, list) else None
    valid = isinstance(first, dict) and first.get("datatype") in V2_DTYPES and isinstance(first.get("shape"), list)
    if not valid or not isinstance(first, dict):
        raise ValueError(f"inputs[0] in the model config needs a name, a datatype and a shape; got {first!r}")
    return str(first.get("name", "input")), V2_DTYPES[first["datatype"]], [int(d) for d in first["shape"]]


def from_json(value: list[Any], dtype_name: Any) -> torch.Tensor:
    if dtype_name not in DTYPES:
        raise InvalidInput(f"Unknown dtype {dtype_name!r}; expected one of {', '.join(DTYPES)}")
    try:
        return torch.tensor(value, dtype=DTYPES[dtype_name])
    except (TypeError, ValueError, RuntimeError, OverflowError, RecursionError) as exc:
        raise InvalidInput(f"The data is not a rectangular array of numbers: {exc}") from None


def load_tensor(raw: bytes | bytearray) -> torch.Tensor:
    """One dense tensor from ``torch.save`` bytes; never unpickles anything but tensors and plain containers."""
    try:
        value = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as exc:  # a corrupt zip, a refused pickle global, a bad record: all the client's input
        reason = str(exc).split(". ")[0][:200]  # torch's zip errors go on for a paragraph
        raise InvalidInput(f"Not a tensor saved with torch.save: {reason}") from None
    if not isinstance(value, torch.Tensor):
        raise InvalidInput(f"Expected one tensor saved with torch.save, got {type(value).__name__}")
    if value.layout != torch.strided or value.is_quantized or value.dtype not in DTYPES.values():
        raise InvalidInput(f"Unsupported tensor ({value.layout}, {value.dtype}); send a dense tensor")
    if value.numel() * value.element_size() > value.untyped_storage().nbytes():
        raise InvalidInput("The tensor's shape and strides view more elements than it holds")
    return value


def split(output: Any, sizes: list[int]) -> list[Any] | None:
    """``output`` of a concatenated batch split back per request, or None if it has no such batch dimension."""
    total = sum(sizes)
    if isinstance(output, torch.Tensor):
        return list(torch.split(output, sizes)) if output.dim() > 0 and output.shape[0] == total else None
    if isinstance(output, tuple | list):
        columns = [split(item, sizes) for item in output]
        if any(column is None for column in columns):
            return None
        rows = [[column[i] for column in columns if column is not None] for i in range(len(sizes))]
        return [tuple(row) for row in rows] if isinstance(output, tuple) else rows
    if isinstance(output, dict):
        values = {key: split(item, sizes) for key, item in output.items()}
        if any(value is None for value in values.values()):
            return None
        return [{key: value[i] for key, value in values.items() if value is not None} for i in range(len(sizes))]
    return None


def to_json(output: Any) -> Any:
    if isinstance(output, torch.Tensor):
        return output.tolist()
    if isinstance(output, tuple | list):
        return [to_json(item) for item in output]
    if isinstance(output, dict):
        return {str(key): to_json(value) for key, value in output.items()}
    return output


def saved(output: Any) -> bytes:
    """``output`` as ``torch.save`` bytes, each tensor copied out of the batch's output first: a view would carry
    the whole batch's storage, other requests' answers included."""
    buffer = io.BytesIO()
    torch.save(compact(output), buffer)
    return buffer.getvalue()


def compact(output: Any) -> Any:
    if isinstance(output, torch.Tensor):
        return output.clone(memory_format=torch.contiguous_format)
    if isinstance(output, tuple | list):
        items = [compact(item) for item in output]
        return tuple(items) if isinstance(output, tuple) else items
    if isinstance(output, dict):
        return {key: compact(value) for key, value in output.items()}
    return output


def shape(tensor: torch.Tensor) -> list[int]:
    return list(tensor.shape)
