"""KServe envelopes (issue 14): with ``service_envelope=kserve`` or ``kservev2`` the KServe routes go through the
handler inside TorchServe's envelope, so that KServe's TorchServe runtime and its mnist example work unchanged."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from servekit.envelope import output, reshape
from tests.helpers import make_archive, running_server

# an mnist-like handler: a small CNN on 1x28x28 images, seeded so the answer is fixed
MNIST = """
import torch
from servekit.handler import BaseHandler


class Mnist(BaseHandler):
    def initialize(self, context):
        torch.manual_seed(0)
        self.model = torch.nn.Sequential(
            torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
            torch.nn.Linear(4, 10),
        ).eval()
        self.context = context

    def preprocess(self, data):
        return torch.stack([torch.as_tensor(row.get("data"), dtype=torch.float32).reshape(1, 28, 28) for row in data])

    def postprocess(self, data):
        return data.argmax(1).tolist()
"""
IMAGE = [[0.5] * 28 for _ in range(28)]


def serve(tmp_path: Path, envelope: str) -> Any:
    store = tmp_path / "store"
    store.mkdir()
    make_archive(store, "mnist", MNIST, work=tmp_path / "work")
    return running_server(tmp_path / "run", store, config={"service_envelope": envelope})


def test_kserve_v1_predict_goes_through_the_handler(tmp_path: Path) -> None:
    with serve(tmp_path, "kserve") as server:
        response = server.post("/v1/models/mnist:predict", json={"instances": [{"data": IMAGE}]})
        assert response.status_code == 200, response.text
        (digit,) = response.json()["predictions"]
        assert response.json() == {"predictions": [digit]} and digit in range(10)


def test_kserve_v2_infer_goes_through_the_handler(tmp_path: Path) -> None:
    tensor = {"name": "input-0", "shape": [1, 28, 28], "datatype": "FP32", "data": [x for row in IMAGE for x in row]}
    with serve(tmp_path, "kservev2") as server:
        response = server.post("/v2/models/mnist/infer", json={"id": "d3b15cad", "inputs": [tensor]})
        assert response.status_code == 200, response.text
        digit = response.json()["outputs"][0]["data"][0]
        assert digit in range(10)
        assert response.json() == {
            "id": "d3b15cad",
            "model_name": "mnist",
            "model_version": "1.0",
            "outputs": [{"name": "input-0", "datatype": "INT64", "data": [digit], "shape": [1]}],
        }


@pytest.mark.parametrize(
    ("item", "datatype", "data"),
    [
        ([1, 2], "INT64", [1, 2]),
        ([[1, 2.5]], "FP64", [1.0, 2.5]),
        ([True, False], "BOOL", [True, False]),
        ("cat", "BYTES", ["cat"]),
        ([1, "a"], "BYTES", ["1", "a"]),
        ([2**63], "UINT64", [2**63]),
        ([], "FP64", []),
    ],
)
def test_v2_output_datatype_is_numpys(item: Any, datatype: str, data: list[Any]) -> None:
    assert output(item, "o") == {"name": "o", "datatype": datatype, "data": data, "shape": [len(data)]}


def test_v2_output_of_a_tensor_keeps_its_dtype() -> None:
    import torch

    assert output(torch.tensor([[1.5], [2.0]]), "o")["datatype"] == "FP32"


def test_v2_input_is_reshaped_like_numpy() -> None:
    assert reshape([1, 2, 3, 4], [2, -1]) == [[1, 2], [3, 4]]
    with pytest.raises(ValueError, match="cannot reshape"):
        reshape([1, 2, 3], [2, 2])
