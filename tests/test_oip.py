"""The Open Inference Protocol codec on its own: parsing, validation and the reserved parameters."""

from __future__ import annotations

import json
import struct

import pytest

from servekit.errors import BadRequestError
from servekit.oip import TensorSpec, parse_request, validate


def body(**fields: object) -> bytes:
    return json.dumps(fields).encode()


def test_oip_timeout_parameter_is_the_deadline_in_seconds() -> None:
    request = parse_request(
        body(
            parameters={"timeout": 250_000, "priority": 2, "triton_x": 1},
            inputs=[{"name": "x", "shape": [1], "datatype": "FP32", "data": [1.0]}],
        ),
        None,
    )
    assert request.timeout_s == 0.25


def test_oip_nested_and_flat_json_data_pack_the_same() -> None:
    flat = parse_request(body(inputs=[{"name": "x", "shape": [2, 2], "datatype": "INT32", "data": [1, 2, 3, 4]}]), None)
    nested = parse_request(
        body(inputs=[{"name": "x", "shape": [2, 2], "datatype": "INT32", "data": [[1, 2], [3, 4]]}]), None
    )
    assert flat.inputs[0].data == nested.inputs[0].data == struct.pack("<4i", 1, 2, 3, 4)


def test_oip_binary_and_json_inputs_mix_in_order() -> None:
    header = body(inputs=[
        {"name": "a", "shape": [2], "datatype": "FP32", "parameters": {"binary_data_size": 8}},
        {"name": "b", "shape": [1], "datatype": "BYTES", "data": ["hi"]},
        {"name": "c", "shape": [1], "datatype": "INT64", "parameters": {"binary_data_size": 8}},
    ])  # fmt: skip
    raw = struct.pack("<2f", 1.5, 2.5) + struct.pack("<q", 7)
    request = parse_request(header + raw, len(header))
    assert [t.data for t in request.inputs] == [raw[:8], struct.pack("<I", 2) + b"hi", raw[8:]]


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (body(inputs=[{"name": "x", "shape": [2**31, 2**31], "datatype": "FP32", "data": []}]), "too many elements"),
        (body(inputs=[{"name": "x", "shape": [-1], "datatype": "FP32", "data": []}]), "non-negative"),
        (body(inputs=[{"name": "x", "shape": [1], "datatype": "FP99", "data": [1]}]), "unknown datatype"),
        (body(inputs=[{"name": "x", "shape": [1], "datatype": "INT8", "data": [300]}]), "does not fit"),
        (body(inputs=[{"name": "x", "shape": [1], "datatype": "INT8", "data": [1.5]}]), "does not fit"),
        (
            body(inputs=[{"name": "x", "shape": [2], "datatype": "BYTES", "parameters": {"binary_data_size": 3}}])
            + b"\xff\xff\xff",
            "BYTES data",
        ),
        (body(inputs=[]), "non-empty 'inputs'"),
        (b"[1, 2]", "non-empty 'inputs'"),
    ],
)
def test_oip_bad_requests_name_the_problem(payload: bytes, message: str) -> None:
    length = payload.index(b"}]}") + 3 if b"binary_data_size" in payload else None
    with pytest.raises(BadRequestError, match=message):
        parse_request(payload, length)


def test_oip_validate_checks_names_types_and_shapes() -> None:
    specs = (TensorSpec("x", "FP32", (-1, 4)),)
    ok = parse_request(body(inputs=[{"name": "x", "shape": [3, 4], "datatype": "FP32", "data": [0.0] * 12}]), None)
    validate(ok, specs, ())
    wrong = parse_request(body(inputs=[{"name": "y", "shape": [1], "datatype": "FP32", "data": [0.0]}]), None)
    with pytest.raises(BadRequestError, match=r"missing input\(s\) \['x'\]"):
        validate(wrong, specs, ())
