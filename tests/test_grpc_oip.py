"""The Open Inference Protocol over gRPC, proven with the real ``tritonclient.grpc`` (and its generated
``service_pb2``, Triton's own definitions, for requests with typed contents) and with a client generated from
TorchServe 0.12's ``open_inference_grpc.proto`` (its service name), against a real server with token authorization:
health and metadata, FP32 through a TorchScript model, INT64/FP32/BF16/BYTES through ``infer_tensors``, raw and
typed contents, gRPC and REST requests batched together, and the errors a client can cause.

This process never imports ``servekit.grpc`` (see ``tests/torchserve_protos.py``)."""

from __future__ import annotations

import concurrent.futures
import importlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc
import httpx
import ml_dtypes
import numpy as np
import pytest
import torch
import tritonclient.grpc as triton
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from tests.helpers import Server, build_mlp, free_port, running_server
from tests.test_v2 import tensor_store
from tests.torchserve_protos import compile_protos, torchserve_protos


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("grpc_oip")
    store, _ = tensor_store(root)
    config = {"enable_grpc": "true", "grpc_inference_port": str(free_port()), "grpc_management_port": str(free_port())}
    with running_server(root / "run", store, ("all",), config, ("--ncs",)) as srv:
        yield srv


@pytest.fixture(scope="module")
def key(server: Server) -> str:
    return str(json.loads((server.workdir / "key_file.json").read_text())["inference"]["key"])


@pytest.fixture(scope="module")
def target(server: Server) -> str:
    return "127.0.0.1:" + (server.workdir / "config.properties").read_text().split("grpc_inference_port=")[1].split()[0]


@pytest.fixture(scope="module")
def client(target: str) -> Iterator[triton.InferenceServerClient]:
    c = triton.InferenceServerClient(url=target)
    yield c
    c.close()


@pytest.fixture(scope="module")
def stub(target: str) -> Any:
    """Triton's own generated stub, for requests tritonclient would not build (typed contents, odd shapes)."""
    return service_pb2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(target))


def auth(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def expected(x: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return build_mlp()(torch.from_numpy(x)).numpy()  # type: ignore[no-any-return]


def mlp_input(x: np.ndarray) -> triton.InferInput:
    tensor = triton.InferInput("x", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    return tensor


def status(call: Any, *args: Any, **kwargs: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as failed:
        call(*args, **kwargs)
    return failed.value.code(), failed.value.details() or ""


def test_grpc_oip_health_and_metadata_with_and_without_key(client: triton.InferenceServerClient, key: str) -> None:
    assert client.is_server_live() and client.is_server_ready()  # no key needed, as /v2/health/*
    headers = auth(key)
    assert client.is_model_ready("mlp", headers=headers) and client.is_model_ready("mlp", "1.0", headers=headers)
    server_meta = client.get_server_metadata(headers=headers)
    assert server_meta.name == "servekit" and "binary_tensor_data" in server_meta.extensions
    meta = client.get_model_metadata("mlp", headers=headers)
    assert meta.name == "mlp" and list(meta.versions) == ["1.0"] and meta.platform == "pytorch_torchscript"
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [("x", "FP32", [-1, 16])]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [("y", "FP32", [-1, 4])]
    with pytest.raises(InferenceServerException) as unknown:
        client.get_model_metadata("nope", headers=headers)
    assert unknown.value.status() == "StatusCode.NOT_FOUND"
    with pytest.raises(InferenceServerException) as keyless:
        client.is_model_ready("mlp")
    assert keyless.value.status() == "StatusCode.PERMISSION_DENIED"


def test_grpc_oip_infer_fp32_raw(client: triton.InferenceServerClient, key: str) -> None:
    x = np.random.default_rng(0).standard_normal((3, 16)).astype(np.float32)
    result = client.infer("mlp", [mlp_input(x)], request_id="r-7", headers=auth(key))
    np.testing.assert_allclose(result.as_numpy("y"), expected(x), rtol=1e-5, atol=1e-6)
    response = result.get_response()
    assert response.id == "r-7" and response.model_name == "mlp" and response.model_version == "1.0"


def test_grpc_oip_infer_many_datatypes_raw(client: triton.InferenceServerClient, key: str) -> None:
    a = np.array([[1, 2, 3], [4, 5, 6]], dtype=np.int64)
    b = np.array([[0.5, 1.5, 2.5], [3.5, 4.5, 5.5]], dtype=np.float32)
    c = np.array([[1.5, -2.0], [0.25, 8.0]], dtype=ml_dtypes.bfloat16)
    words = np.array([b"hello", "w\u00f6rld".encode()], dtype=np.object_)
    inputs = []
    for name, value, datatype in (("a", a, "INT64"), ("b", b, "FP32"), ("c", c, "BF16"), ("words", words, "BYTES")):
        tensor = triton.InferInput(name, list(value.shape), datatype)
        tensor.set_data_from_numpy(value)
        inputs.append(tensor)
    outputs = [triton.InferRequestedOutput("sum"), triton.InferRequestedOutput("upper")]
    result = client.infer("multi", inputs, outputs=outputs, headers=auth(key))
    np.testing.assert_array_equal(result.as_numpy("sum"), a + b.astype(np.float64))
    assert list(result.as_numpy("upper")) == [b"HELLO", "w\u00f6rld".encode().upper()]  # bytes: ASCII upper case
    assert result.as_numpy("twice") is None  # not asked for
    everything = client.infer("multi", inputs, headers=auth(key))
    twice = everything.as_numpy("twice")
    assert twice.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(twice.astype(np.float32), c.astype(np.float32) * 2)


def test_grpc_oip_typed_contents_from_tritons_own_messages(stub: Any, key: str) -> None:
    request = service_pb2.ModelInferRequest(model_name="multi", id="typed")
    a = request.inputs.add(name="a", datatype="INT64", shape=[1, 3])
    a.contents.int64_contents.extend([1, 2, 3])
    b = request.inputs.add(name="b", datatype="FP32", shape=[1, 3])
    b.contents.fp32_contents.extend([0.5, 0.25, -1.0])
    c = request.inputs.add(name="c", datatype="BF16", shape=[1, 2])
    words = request.inputs.add(name="words", datatype="BYTES", shape=[2])
    words.contents.bytes_contents.extend([b"ab", b"c"])
    # BF16 has no typed contents: with one input typed, all must be; so BF16 alone is refused, naming the rule
    code, message = status(stub.ModelInfer, request, metadata=tuple(auth(key).items()))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "c: BF16 data must come in raw_input_contents" in message
    request.inputs.remove(c)
    code, message = status(stub.ModelInfer, request, metadata=tuple(auth(key).items()))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "missing input(s) ['c']" in message
    request = service_pb2.ModelInferRequest(model_name="mlp", id="typed")
    x = request.inputs.add(name="x", datatype="FP32", shape=[2, 16])
    values = np.arange(32, dtype=np.float32) / 10
    x.contents.fp32_contents.extend(values.tolist())
    response = stub.ModelInfer(request, metadata=tuple(auth(key).items()))
    assert response.id == "typed" and [o.name for o in response.outputs] == ["y"]
    assert list(response.outputs[0].shape) == [2, 4] and response.outputs[0].datatype == "FP32"
    y = np.frombuffer(response.raw_output_contents[0], dtype="<f4").reshape(2, 4)
    np.testing.assert_allclose(y, expected(values.reshape(2, 16)), rtol=1e-5, atol=1e-6)


def reshaped(request: Any) -> None:
    request.inputs[0].ClearField("shape")
    request.inputs[0].shape.extend([1, 32])  # as many bytes as [2, 16]


@pytest.mark.parametrize(
    ("change", "code", "words"),
    [
        (lambda r: setattr(r, "model_name", "nope"), grpc.StatusCode.NOT_FOUND, "nope"),
        (lambda r: r.inputs[0].shape.__setitem__(1, 15), grpc.StatusCode.INVALID_ARGUMENT, "needs 120 bytes, got 128"),
        (lambda r: setattr(r.inputs[0], "datatype", "INT32"), grpc.StatusCode.INVALID_ARGUMENT, "expected datatype"),
        (reshaped, grpc.StatusCode.INVALID_ARGUMENT, "expected shape [-1, 16], got [1, 32]"),
        (lambda r: setattr(r.inputs[0], "datatype", "NOPE"), grpc.StatusCode.INVALID_ARGUMENT, "unknown datatype"),
        (
            lambda r: r.raw_input_contents.__setitem__(0, b"\0" * 12),
            grpc.StatusCode.INVALID_ARGUMENT,
            "needs 128 bytes",
        ),
        (lambda r: r.raw_input_contents.append(b"x"), grpc.StatusCode.INVALID_ARGUMENT, "2 entries for 1 inputs"),
        (lambda r: r.outputs.add(name="z"), grpc.StatusCode.INVALID_ARGUMENT, "unknown output z"),
    ],
)
def test_grpc_oip_bad_requests_name_what_is_wrong(stub: Any, key: str, change: Any, code: Any, words: str) -> None:
    request = service_pb2.ModelInferRequest(model_name="mlp")
    request.inputs.add(name="x", datatype="FP32", shape=[2, 16])
    request.raw_input_contents.append(np.zeros((2, 16), dtype=np.float32).tobytes())
    change(request)
    got_code, message = status(stub.ModelInfer, request, metadata=tuple(auth(key).items()))
    assert got_code == code and words in message


def test_grpc_oip_and_rest_requests_share_batches(
    server: Server, client: triton.InferenceServerClient, key: str
) -> None:
    """slowdouble answers each request with the batch's row count: 12 gRPC and 12 REST requests at once, against a
    handler that takes 20 ms per batch of up to 16, land in shared batches."""
    x = np.ones((1, 4), dtype=np.float32)

    def over_grpc(i: int) -> int:
        tensor = triton.InferInput("x", [1, 4], "FP32")
        tensor.set_data_from_numpy(x * i)
        result = client.infer("slowdouble", [tensor], headers=auth(key))
        np.testing.assert_array_equal(result.as_numpy("y"), x * i * 2)
        return int(result.as_numpy("rows")[0, 0])

    def over_rest(i: int) -> int:
        body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": (x * i).ravel().tolist()}]}
        answer = httpx.post(f"{server.inference}/v2/models/slowdouble/infer", json=body, headers=auth(key), timeout=30)
        assert answer.status_code == 200, answer.text
        outputs = {o["name"]: o["data"] for o in answer.json()["outputs"]}
        assert outputs["y"] == (x * i * 2).ravel().tolist()
        return int(outputs["rows"][0])

    with concurrent.futures.ThreadPoolExecutor(24) as pool:
        futures = [pool.submit(over_grpc if i % 2 else over_rest, i) for i in range(24)]
        rows = [f.result() for f in futures]
    assert max(rows) > 1  # some requests were batched: both kinds share the queue (a lone request's batch has 1 row)


def test_grpc_oip_under_torchserves_service_name(tmp_path: Path, target: str, key: str) -> None:
    """A client generated from TorchServe 0.12's open_inference_grpc.proto (package
    org.pytorch.serve.grpc.openinference) gets the same answers."""
    out = tmp_path / "clients"
    out.mkdir()
    compile_protos(torchserve_protos(), ("open_inference_grpc",), f"--python_out={out}", f"--grpc_python_out={out}")
    sys.path.insert(0, str(out))
    try:
        messages: ModuleType = importlib.import_module("open_inference_grpc_pb2")
        stubs: ModuleType = importlib.import_module("open_inference_grpc_pb2_grpc")
    finally:
        sys.path.remove(str(out))
    ts = stubs.GRPCInferenceServiceStub(grpc.insecure_channel(target))
    metadata = tuple(auth(key).items())
    assert ts.ServerLive(messages.ServerLiveRequest()).live
    assert ts.ModelReady(messages.ModelReadyRequest(name="mlp"), metadata=metadata).ready
    request = messages.ModelInferRequest(model_name="mlp")
    request.inputs.add(name="x", datatype="FP32", shape=[1, 16])
    x = np.linspace(-1, 1, 16, dtype=np.float32).reshape(1, 16)
    request.raw_input_contents.append(x.tobytes())
    response = ts.ModelInfer(request, metadata=metadata)
    y = np.frombuffer(response.raw_output_contents[0], dtype="<f4").reshape(1, 4)
    np.testing.assert_allclose(y, expected(x), rtol=1e-5, atol=1e-6)
