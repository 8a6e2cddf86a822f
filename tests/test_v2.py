"""The Open Inference Protocol (KServe v2) and KServe v1, proven with the real tritonclient against a real server."""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Iterator
from pathlib import Path

import httpx
import ml_dtypes
import numpy as np
import pytest
import torch
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from servekit import archiver
from tests.helpers import MLP_PY, Server, build_mlp, make_archive, running_server, write

MLP_CONFIG = """
batchSize: 8
maxBatchDelay: 5
inputs:
  - {name: x, datatype: FP32, shape: [-1, 16]}
outputs:
  - {name: y, datatype: FP32, shape: [-1, 4]}
"""

MULTI_HANDLER = """
class Multi:
    def initialize(self, context):
        pass

    def handle(self, data, context):
        return ["not used"] * len(data)

    def infer_tensors(self, inputs, context):
        return {
            "sum": inputs["a"].double() + inputs["b"].double(),
            "twice": inputs["c"] * 2,
            "upper": [word.upper() for word in inputs["words"]],
        }
"""

MULTI_CONFIG = """
batchSize: 8
inputs:
  - {name: a, datatype: INT64, shape: [-1, 3]}
  - {name: b, datatype: FP32, shape: [-1, 3]}
  - {name: c, datatype: BF16, shape: [-1, 2]}
  - {name: words, datatype: BYTES, shape: [-1]}
outputs:
  - {name: sum, datatype: FP64, shape: [-1, 3]}
  - {name: twice, datatype: BF16, shape: [-1, 2]}
  - {name: upper, datatype: BYTES, shape: [-1]}
"""

# Slow enough that concurrent requests queue up behind it and are batched along the first dimension.
SLOW_DOUBLE_HANDLER = """
import time


class SlowDouble:
    def initialize(self, context):
        pass

    def handle(self, data, context):
        return ["not used"] * len(data)

    def infer_tensors(self, inputs, context):
        time.sleep(0.02)
        return {"y": inputs["x"] * 2, "rows": inputs["x"].new_full((inputs["x"].shape[0], 1), inputs["x"].shape[0])}
"""

SLOW_DOUBLE_CONFIG = """
batchSize: 16
inputs:
  - {name: x, datatype: FP32, shape: [-1, 4]}
outputs:
  - {name: y, datatype: FP32, shape: [-1, 4]}
  - {name: rows, datatype: FP32, shape: [-1, 1]}
"""


def tensor_store(root: Path) -> tuple[Path, Path]:
    """A model store (and a scratch folder) with ``mlp`` (TorchScript, declared inputs and outputs), ``multi``
    (INT64, FP32, BF16 and BYTES through ``infer_tensors``) and ``slowdouble`` (answers with its batch's size)."""
    store, work = root / "store", root / "work"
    store.mkdir()
    work.mkdir()
    torch.jit.trace(build_mlp(), torch.zeros(1, 16)).save(str(work / "mlp.pt"))  # type: ignore[no-untyped-call]
    write(work / "model-config.yaml", MLP_CONFIG)
    # no custom handler: the built-in base_handler loads the TorchScript model, v2 requests run it directly
    archiver.main(["--model-name", "mlp", "--version", "1.0", "--serialized-file", str(work / "mlp.pt"),
                   "--handler", "base_handler", "--config-file", str(work / "model-config.yaml"),
                   "--export-path", str(store)])  # fmt: skip
    make_archive(store, "multi", MULTI_HANDLER, work=work, config=MULTI_CONFIG)
    make_archive(store, "slowdouble", SLOW_DOUBLE_HANDLER, work=work, config=SLOW_DOUBLE_CONFIG)
    return store, work


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("v2")
    store, work = tensor_store(root)
    eager = work / "eager"
    write(eager / "model.py", MLP_PY)
    torch.save(build_mlp().state_dict(), eager / "weights.pt")
    archiver.main(["--model-name", "mlp_eager", "--version", "1.0", "--model-file", str(eager / "model.py"),
                   "--serialized-file", str(eager / "weights.pt"), "--handler", "base_handler",
                   "--config-file", str(work / "model-config.yaml"), "--export-path", str(store)])  # fmt: skip
    with running_server(root / "run", store) as srv:
        yield srv


@pytest.fixture
def client(server: Server) -> Iterator[triton.InferenceServerClient]:
    c = triton.InferenceServerClient(url=server.inference.removeprefix("http://"), concurrency=8)
    yield c
    c.close()


def expected(x: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return build_mlp()(torch.from_numpy(x)).numpy()  # type: ignore[no-any-return]


def mlp_input(x: np.ndarray, binary: bool) -> triton.InferInput:
    tensor = triton.InferInput("x", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=binary)
    return tensor


def test_v2_health_and_metadata(client: triton.InferenceServerClient) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("mlp") and client.is_model_ready("mlp", "1.0")
    assert not client.is_model_ready("nope")
    assert "binary_tensor_data" in client.get_server_metadata()["extensions"]
    meta = client.get_model_metadata("mlp")
    assert meta["name"] == "mlp" and meta["versions"] == ["1.0"]
    assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 16]}]
    assert meta["outputs"] == [{"name": "y", "datatype": "FP32", "shape": [-1, 4]}]


@pytest.mark.parametrize("model", ["mlp", "mlp_eager"])
@pytest.mark.parametrize("binary", [False, True])
def test_v2_infer_fp32_json_and_binary(client: triton.InferenceServerClient, binary: bool, model: str) -> None:
    x = np.random.default_rng(0).standard_normal((3, 16), dtype=np.float32)
    outputs = [triton.InferRequestedOutput("y", binary_data=binary)]
    result = client.infer(model, [mlp_input(x, binary)], outputs=outputs, request_id="req-7")
    assert result.get_response()["id"] == "req-7"
    np.testing.assert_allclose(result.as_numpy("y"), expected(x), atol=1e-5)


def test_v2_two_model_inputs_all_datatypes_and_selected_outputs(client: triton.InferenceServerClient) -> None:
    a = np.array([[1, 2, 3], [4, 5, 6]], dtype=np.int64)
    b = np.array([[0.5, 0.5, 0.5], [1.5, 1.5, 1.5]], dtype=np.float32)
    c = np.array([[1.0, -2.0], [0.25, 3.0]], dtype=ml_dtypes.bfloat16)
    words = np.array([b"hello", b"world"], dtype=np.object_)
    inputs = []
    for name, value, datatype in (("a", a, "INT64"), ("b", b, "FP32"), ("c", c, "BF16"), ("words", words, "BYTES")):
        tensor = triton.InferInput(name, list(value.shape), datatype)
        tensor.set_data_from_numpy(value)
        inputs.append(tensor)
    result = client.infer("multi", inputs)
    np.testing.assert_allclose(result.as_numpy("sum"), a + b.astype(np.float64))
    np.testing.assert_allclose(result.as_numpy("twice").astype(np.float32), c.astype(np.float32) * 2)
    assert list(result.as_numpy("upper")) == [b"HELLO", b"WORLD"]
    only = client.infer("multi", inputs, outputs=[triton.InferRequestedOutput("upper", binary_data=False)])
    assert [o["name"] for o in only.get_response()["outputs"]] == ["upper"]
    assert list(only.as_numpy("upper")) == ["HELLO", "WORLD"]  # JSON BYTES come back as str


def test_v2_concurrent_requests_are_correct_and_batched(server: Server) -> None:
    rng = np.random.default_rng(1)
    xs = [rng.standard_normal((1, 4), dtype=np.float32) for _ in range(64)]
    client = triton.InferenceServerClient(url=server.inference.removeprefix("http://"), concurrency=64)
    try:
        pending = []
        for x in xs:
            tensor = triton.InferInput("x", [1, 4], "FP32")
            tensor.set_data_from_numpy(x)
            pending.append(client.async_infer("slowdouble", [tensor]))
        results = [p.get_result() for p in pending]
    finally:
        client.close()
    for x, result in zip(xs, results, strict=True):
        np.testing.assert_allclose(result.as_numpy("y"), x * 2)  # each request got its own rows back
    rows_per_forward = [int(result.as_numpy("rows")[0, 0]) for result in results]
    assert max(rows_per_forward) > 1, "concurrent requests ran through the model together"
    assert max(rows_per_forward) <= 16  # batchSize


def status_of(call: object) -> int:
    with pytest.raises(InferenceServerException) as info:
        call()  # type: ignore[operator]
    return int(info.value.status())


def test_v2_errors_have_the_right_status(client: triton.InferenceServerClient) -> None:
    x = np.zeros((1, 16), dtype=np.float32)
    assert status_of(lambda: client.infer("nope", [mlp_input(x, False)])) == 404
    wrong_shape = np.zeros((1, 15), dtype=np.float32)
    with pytest.raises(InferenceServerException, match=r"input x: expected shape \[-1, 16\], got \[1, 15\]"):
        client.infer("mlp", [mlp_input(wrong_shape, True)])
    wrong_type = triton.InferInput("x", [1, 16], "FP64")
    wrong_type.set_data_from_numpy(np.zeros((1, 16), dtype=np.float64))
    with pytest.raises(InferenceServerException, match="expected datatype FP32, got FP64") as info:
        client.infer("mlp", [wrong_type])
    assert info.value.status() == "400"


@pytest.mark.parametrize(
    ("body", "length"),
    [
        (
            b'{"inputs": [{"name": "x", "shape": [1, 16], "datatype": "FP32", "parameters": {"binary_data_size": 64}}]}'
            + b"\0" * 64,
            "9999",
        ),
        (
            b'{"inputs": [{"name": "x", "shape": [1, 16], "datatype": "FP32", "parameters": {"binary_data_size": 64}}]}'
            + b"\0" * 10,
            "103",
        ),
        (
            b'{"inputs": [{"name": "x", "shape": [1, 16], "datatype": "FP32", "parameters": {"binary_data_size": 64}}]}'
            + b"\0" * 64,
            "-5",
        ),
        (b"not json at all", None),
        (b'{"inputs": [{"name": "x", "shape": [-1, 16], "datatype": "FP32", "data": []}]}', None),
        (b'{"inputs": [{"name": "x", "shape": [1, 16], "datatype": "FP32", "data": ["a"]}]}', None),
    ],
)
def test_v2_malformed_requests_are_400_never_500(server: Server, body: bytes, length: str | None) -> None:
    headers = {"content-type": "application/octet-stream"} | (
        {"inference-header-content-length": length} if length else {}
    )
    response = server.post("/v2/models/mlp/infer", content=body, headers=headers)
    assert response.status_code == 400, response.text
    assert response.json()["error"]


def test_v2_reserved_parameters_are_accepted(server: Server) -> None:
    body = {
        "id": "r1",
        "parameters": {"priority": 1, "timeout": 10_000_000, "sequence_id": 0, "triton_enable_empty_final_response": 1},
        "inputs": [{"name": "x", "shape": [1, 16], "datatype": "FP32", "data": [0.0] * 16}],
    }
    response = server.post("/v2/models/mlp/infer", json=body)
    assert response.status_code == 200, response.text
    assert response.json()["id"] == "r1"


def test_v1_predict_instances(server: Server) -> None:
    assert httpx.get(server.inference + "/v1/models").json()["models"] == ["mlp", "mlp_eager", "multi", "slowdouble"]
    assert httpx.get(server.inference + "/v1/models/mlp").json() == {"name": "mlp", "ready": True}
    x = np.random.default_rng(2).standard_normal((2, 16), dtype=np.float32)
    response = server.post("/v1/models/mlp:predict", json={"instances": x.tolist()})
    assert response.status_code == 200, response.text
    np.testing.assert_allclose(np.array(response.json()["predictions"]), expected(x), atol=1e-5)
    assert server.post("/v1/models/nope:predict", json={"instances": [[1]]}).status_code == 404


def test_v1_predictions_of_concurrent_requests_batched_together_stay_apart(server: Server) -> None:
    """The worker writes each request's ``predictions`` from its own rows of the batch's output."""
    xs = [np.random.default_rng(10 + i).standard_normal((1 + i % 3, 16), dtype=np.float32) for i in range(12)]
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(lambda x: server.post("/v1/models/mlp:predict", json={"instances": x.tolist()}), xs))
    for x, response in zip(xs, answers, strict=True):
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == "application/json"
        assert list(response.json()) == ["predictions"]
        np.testing.assert_allclose(np.array(response.json()["predictions"]), expected(x), atol=1e-5)


def test_v2_unknown_output_is_400(client: triton.InferenceServerClient) -> None:
    x = np.zeros((1, 16), dtype=np.float32)
    with pytest.raises(InferenceServerException, match="unknown output"):
        client.infer("mlp", [mlp_input(x, False)], outputs=[triton.InferRequestedOutput("zzz")])


def test_v2_asyncio_client_path(server: Server) -> None:
    async def main() -> int:
        async with httpx.AsyncClient() as http:
            body = {"inputs": [{"name": "x", "shape": [1, 16], "datatype": "FP32", "data": [[0.1] * 16]}]}
            response = await http.post(server.inference + "/v2/models/mlp/versions/1.0/infer", json=body)
            return response.status_code

    assert asyncio.run(main()) == 200


def test_v2_repository_extension_on_the_management_port(server: Server, tmp_path: Path) -> None:
    store = server.workdir.parent / "store"
    denied = triton.InferenceServerClient(url=server.management.removeprefix("http://"))
    with pytest.raises(InferenceServerException) as info:
        denied.unload_model("mlp")
    assert info.value.status() == "405"
    denied.close()
    args = ("--disable-token-auth", "--ncs", "--enable-model-api")
    with running_server(tmp_path / "run", store, models=("mlp=mlp.mar",), args=args) as srv:
        repo = triton.InferenceServerClient(url=srv.management.removeprefix("http://"))
        infer = triton.InferenceServerClient(url=srv.inference.removeprefix("http://"))
        try:
            index = {entry["name"]: entry for entry in repo.get_model_repository_index()}
            assert index["mlp"]["state"] == "READY" and index["multi"]["state"] == "UNAVAILABLE"
            repo.unload_model("mlp")
            assert not infer.is_model_ready("mlp")
            repo.load_model("multi")
            assert infer.is_model_ready("multi")
            repo.load_model("mlp")
            x = np.zeros((1, 16), dtype=np.float32)
            np.testing.assert_allclose(infer.infer("mlp", [mlp_input(x, True)]).as_numpy("y"), expected(x), atol=1e-5)
            with pytest.raises(InferenceServerException, match="not in the model store"):
                repo.load_model("missing")
        finally:
            repo.close()
            infer.close()
