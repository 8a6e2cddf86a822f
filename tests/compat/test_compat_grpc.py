"""The differential test of the gRPC APIs: TorchServe 0.12 and servekit serving the same archives, called by clients
generated from TorchServe's own ``.proto`` files (``tests/torchserve_protos.py``); the answers must be equal, or
differ only as docs/migration.md's gRPC table says. Its own module, so that the other pairs are stopped before this
one starts. Run with `make compat`."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc
import pytest
from google.protobuf import empty_pb2

from tests.compat.archives import build_store
from tests.compat.normalize import WORKERS
from tests.compat.servers import Endpoint, Pair, running_pair
from tests.compat.test_compat_rest import KEYS
from tests.torchserve_protos import client_modules

pytestmark = pytest.mark.compat


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    root = tmp_path_factory.mktemp("compat-grpc")
    with running_pair(
        root, build_store(root, ("echo", "inspect", "noop")), ["echo=echo.mar", "inspect=inspect.mar"], KEYS
    ) as p:
        yield p


@pytest.fixture(scope="module")
def ts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ModuleType]:
    return client_modules(tmp_path_factory.mktemp("torchserve_clients"))


def stubs(endpoint: Endpoint, ts: dict[str, ModuleType]) -> tuple[Any, Any]:
    """The inference and management stubs of one server (its gRPC ports are in its config.properties)."""
    config = (endpoint.log.parent / "config.properties").read_text()
    port = {api: config.split(f"grpc_{api}_port=")[1].split()[0] for api in ("inference", "management")}
    inference = ts["inference_pb2_grpc"].InferenceAPIsServiceStub(
        grpc.insecure_channel(f"127.0.0.1:{port['inference']}")
    )
    channel = grpc.insecure_channel(f"127.0.0.1:{port['management']}")
    return inference, ts["management_pb2_grpc"].ManagementAPIsServiceStub(channel)


def both(pair: Pair, ts: dict[str, ModuleType], call: Any) -> tuple[Any, Any]:
    """``call(inference, management)`` on TorchServe, then on servekit: each answer, or the ``(code, message's first
    line)`` of each failure."""
    answers = []
    for endpoint in (pair.torchserve, pair.servekit):
        try:
            answers.append(call(*stubs(endpoint, ts)))
        except grpc.RpcError as exc:
            error: Any = exc
            answers.append((error.code(), error.details().splitlines()[0]))
    return answers[0], answers[1]


def request(ts: dict[str, ModuleType], model: str, **inputs: bytes) -> Any:
    return ts["inference_pb2"].PredictionsRequest(model_name=model, input=inputs)


def test_compat_grpc_ping(pair: Pair, ts: dict[str, ModuleType]) -> None:
    torchserve, servekit = both(pair, ts, lambda inference, _: inference.Ping(empty_pb2.Empty()).health)
    assert servekit == torchserve == '{\n  "status": "Healthy"\n}'


def test_compat_grpc_predictions_and_streams(pair: Pair, ts: dict[str, ModuleType]) -> None:
    torchserve, servekit = both(pair, ts, lambda i, _: i.Predictions(request(ts, "echo", data=b"hello")).prediction)
    assert servekit == torchserve == b"hello"
    torchserve, servekit = both(
        pair, ts, lambda i, _: [m.prediction for m in i.StreamPredictions(request(ts, "echo", data=b"hi"))]
    )
    assert servekit == [b"hi"]  # migration.md: "StreamPredictions on a handler that does not stream"
    assert torchserve == (grpc.StatusCode.INTERNAL, "Worker died.")


def test_compat_grpc_inputs_reach_the_handler_alike(pair: Pair, ts: dict[str, ModuleType]) -> None:
    def inspect(inference: Any, _: Any) -> Any:
        answer = inference.Predictions(request(ts, "inspect", data=b"\x00\xff", text=b'{"a": 1}'))
        return json.loads(answer.prediction)

    torchserve, servekit = both(pair, ts, inspect)
    assert servekit["fields"] == torchserve["fields"]


def test_compat_grpc_errors_differ_only_as_documented(pair: Pair, ts: dict[str, ModuleType]) -> None:
    torchserve, servekit = both(pair, ts, lambda i, _: i.Predictions(request(ts, "missing", data=b"x")))
    assert torchserve == (grpc.StatusCode.INTERNAL, "Model not found: missing")  # migration.md: "error codes"
    assert servekit == (grpc.StatusCode.NOT_FOUND, "Model not found: missing")
    describe = ts["management_pb2"].DescribeModelRequest(model_name="missing")
    torchserve, servekit = both(pair, ts, lambda _, m: m.DescribeModel(describe))
    assert servekit == torchserve == (grpc.StatusCode.NOT_FOUND, "Model not found: missing")


def test_compat_grpc_management(pair: Pair, ts: dict[str, ModuleType]) -> None:
    m = ts["management_pb2"]
    torchserve, servekit = both(pair, ts, lambda _, mg: mg.ListModels(m.ListModelsRequest(limit=10)).msg)
    assert servekit == torchserve  # the text, as TorchServe's Gson lays it out
    describe = m.DescribeModelRequest(model_name="inspect")  # echo: TorchServe's worker died above
    torchserve, servekit = both(pair, ts, lambda _, mg: re.sub(*WORKERS, mg.DescribeModel(describe).msg, flags=re.M))
    assert servekit == torchserve  # every field of TorchServe's describe, in its order and layout
    register = m.RegisterModelRequest(url="noop.mar", initial_workers=1, synchronous=True)
    torchserve, servekit = both(pair, ts, lambda _, mg: mg.RegisterModel(register).msg)
    assert servekit == torchserve == 'Model "noop" Version: 1.0 registered with 1 initial workers'
    scale = m.ScaleWorkerRequest(model_name="noop", min_worker=2, synchronous=True)
    torchserve, servekit = both(pair, ts, lambda _, mg: mg.ScaleWorker(scale).msg)
    assert servekit == torchserve == "Workers scaled to 2 for model: noop"
    default = m.SetDefaultRequest(model_name="noop", model_version="1.0")
    torchserve, servekit = both(pair, ts, lambda _, mg: mg.SetDefault(default).msg)
    assert servekit == torchserve
    unregister = m.UnregisterModelRequest(model_name="noop")
    torchserve, servekit = both(pair, ts, lambda _, mg: mg.UnregisterModel(unregister).msg)
    assert servekit == torchserve == 'Model "noop" unregistered'


def test_compat_grpc_uses_the_ports_of_its_own_config(pair: Pair) -> None:
    for endpoint in (pair.torchserve, pair.servekit):
        assert "grpc_inference_port=" in Path(endpoint.log.parent / "config.properties").read_text()
