"""TorchServe's request envelopes (``service_envelope``, ``ts/torch_handler/request_envelope/``): a wrapper around a
handler's ``handle`` that turns a KServe request into the handler's ``data`` and its results into a KServe answer.

- ``kserve`` (v1): only request 0's body counts; its ``instances`` are the handler's data, and the results are
  answered as one ``{"predictions": results}`` (``{"explanations": results}`` when the ``explain`` header is
  ``"True"``).
- ``kservev2``: request 0's ``inputs`` are the handler's data, each input's ``data`` reshaped to its ``shape``
  (a ``BYTES`` input's ``data`` is its first element); result ``i`` is answered as output ``i``, named after input
  ``i``, flattened, with the datatype numpy would infer for it.

Like TorchServe's, an envelope answers one response for a batch. It reproduces TorchServe's numpy code without numpy.

Runs in the worker process; never imports asyncio or fastapi.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from servekit.handler import Context, EntryPoint

INT64 = (-(2**63), 2**63 - 1)
UINT64_MAX = 2**64 - 1
# torch's and numpy's dtype names -> the Open Inference Protocol's (TorchServe's _NumpyToDatatype)
DATATYPES = {
    "bool": "BOOL",
    "uint8": "UINT8",
    "uint16": "UINT16",
    "uint32": "UINT32",
    "uint64": "UINT64",
    "int8": "INT8",
    "int16": "INT16",
    "int32": "INT32",
    "int64": "INT64",
    "float16": "FP16",
    "float32": "FP32",
    "float64": "FP64",
}


def wrap(handle: EntryPoint, envelope: str) -> EntryPoint:
    """``handle`` inside the envelope named ``envelope`` (``kserve`` or ``kservev2``)."""
    parse, answer = {"kserve": (_v1_parse, _v1_answer), "kservev2": (_v2_parse, _v2_answer)}[envelope]
    return _enveloped(handle, parse, answer)


def _enveloped(
    handle: EntryPoint,
    parse: Callable[[list[Any], Context], Any],
    answer: Callable[[Any, Context], list[Any]],
) -> EntryPoint:
    def enveloped(data: list[Any], context: Context) -> Any:
        if data:
            data = parse(data, context)
        results = handle(data, context)
        return answer(results, context) if results else results

    return enveloped


def _first_body(data: list[Any]) -> Any:
    row = data[0]
    return row.get("data") or row.get("body")


def _v1_parse(data: list[Any], context: Context) -> Any:
    body = _first_body(data)
    if isinstance(body, (bytes, bytearray)):
        body = json.loads(body.decode())
    return body.get("instances")


def _v1_answer(results: Any, context: Context) -> list[Any]:
    explain = bool(context.request_processor) and context.get_request_header(0, "explain") == "True"
    return [{"explanations" if explain else "predictions": results}]


def _v2_parse(data: list[Any], context: Context) -> Any:
    bodies = [row.get("data") or row.get("body") for row in data]
    if isinstance(bodies[0], (bytes, bytearray)):
        bodies = [json.loads(body.decode("utf8")) for body in bodies]
    names = []
    for tensor in bodies[0]["inputs"]:
        if tensor["datatype"] == "BYTES":
            tensor["data"] = tensor["data"][0]
        else:
            tensor["data"] = reshape(tensor["data"], tensor["shape"])
        names.append(tensor["name"])
    context.input_names = names  # type: ignore[attr-defined]
    request_id = bodies[0].get("id")
    if request_id and request_id.strip():
        context.input_request_id = request_id  # type: ignore[attr-defined]
    return bodies[0].get("inputs")


def _v2_answer(results: Any, context: Context) -> list[Any]:
    request_id = getattr(context, "input_request_id", None)
    if request_id is not None:
        del context.input_request_id  # type: ignore[attr-defined]
    else:
        request_id = context.get_request_id(0)
    model = (context.manifest or {}).get("model", {})
    names = context.input_names  # type: ignore[attr-defined]
    del context.input_names  # type: ignore[attr-defined]
    outputs = [output(item, names[i]) for i, item in enumerate(results)]
    return [{"id": request_id, "model_name": model.get("modelName"), "model_version": model.get("modelVersion"),
             "outputs": outputs}]  # fmt: skip


def output(item: Any, name: str) -> dict[str, Any]:
    """One v2 output: ``item`` flattened, with the datatype ``numpy.array(item)`` would have."""
    if hasattr(item, "dtype") and hasattr(item, "tolist"):  # a tensor or an ndarray keeps its dtype
        dtype = str(item.dtype).removeprefix("torch.")
        values = flatten(item.tolist())
        if dtype not in DATATYPES:
            raise ValueError(f"Output {name!r} has a dtype the Open Inference Protocol cannot carry: {dtype}")
        datatype = DATATYPES[dtype]
    else:
        values = flatten(item)
        datatype, values = infer(values)
    return {"name": name, "datatype": datatype, "data": values, "shape": [len(values)]}


def flatten(value: Any) -> list[Any]:
    """A nested list's elements in row-major order; a scalar is a list of one. A ragged list is a ``ValueError``,
    as numpy's."""
    if not isinstance(value, (list, tuple)):
        return [value]
    shape = _shape(value)
    flat: list[Any] = list(value)
    for _ in shape[1:]:
        flat = [element for row in flat for element in row]
    return flat


def _shape(value: Any) -> list[int]:
    if not isinstance(value, (list, tuple)):
        return []
    shapes = [_shape(row) for row in value]
    if any(shape != shapes[0] for shape in shapes):
        raise ValueError("setting an array element with a sequence: the nested lists are ragged")
    return [len(value), *(shapes[0] if shapes else [])]


def reshape(data: Any, shape: list[int]) -> Any:
    """``numpy.array(data).reshape(shape).tolist()``: elements in row-major order, one ``-1`` inferred, numbers
    promoted to a common type."""
    _, flat = infer(flatten(data))
    sizes = list(shape)
    if sizes.count(-1) == 1:
        known = 1
        for size in sizes:
            known *= size if size != -1 else 1
        if known and len(flat) % known == 0:
            sizes[sizes.index(-1)] = len(flat) // known
    total = 1
    for size in sizes:
        total *= size
    if total != len(flat) or any(size < 0 for size in sizes):
        raise ValueError(f"cannot reshape array of size {len(flat)} into shape {tuple(shape)}")
    nested: list[Any] = flat
    for size in reversed(sizes[1:]):
        nested = [nested[i : i + size] for i in range(0, len(nested), size)]
    return nested if sizes else nested[0]


def infer(values: list[Any]) -> tuple[str, list[Any]]:
    """The datatype numpy infers for a flat list of Python values, and the values as numpy would give them back."""
    kinds = {type(value) for value in values}
    if not values or (kinds <= {bool, int, float} and float in kinds):
        return "FP64", [float(value) for value in values]
    if kinds == {bool}:
        return "BOOL", values
    if kinds <= {bool, int}:
        ints = [int(value) for value in values]
        if INT64[0] <= min(ints) and max(ints) <= INT64[1]:
            return "INT64", ints
        if min(ints) >= 0 and max(ints) <= UINT64_MAX:
            return "UINT64", ints
        return "BYTES", values  # numpy's object array
    if kinds <= {bool, int, float, str} and str in kinds:
        return "BYTES", [value if isinstance(value, str) else str(value) for value in values]
    if bytes in kinds or bytearray in kinds:
        raise ValueError("The Open Inference Protocol has no datatype for a bytes output")
    return "BYTES", values  # numpy's object array (None, dicts)
