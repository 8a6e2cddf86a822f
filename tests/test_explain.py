"""Explanations (issue 14): ``/explanations`` and KServe's explain routes run the handler with the ``explain`` header
``"True"``, and ``BaseHandler`` then answers with ``explain_handle`` -> ``get_insights`` as TorchServe's does."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from tests.helpers import Server, make_archive, running_server

EXPLAINING = """
import json

from servekit.handler import BaseHandler


class Explaining(BaseHandler):
    def preprocess(self, data):
        import torch

        return torch.as_tensor([read(row.get("data") or row.get("body")) for row in data], dtype=torch.float32)

    def get_insights(self, tensor_data, raw_data, target):
        return [{"sum": float(tensor_data.sum()), "raw": read(raw_data), "target": read(target),
                 "explain": self.context.get_request_header(0, "explain")}]


def read(value):
    return json.loads(value) if isinstance(value, (bytes, bytearray)) else value
"""


PLAIN = """
from servekit.handler import BaseHandler


class Plain(BaseHandler):
    def preprocess(self, data):
        import torch

        return torch.as_tensor([row["body"] for row in data])
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("explain")
    store = root / "store"
    store.mkdir()
    make_archive(store, "explaining", EXPLAINING, work=root / "work", model="eager")
    make_archive(store, "plain", PLAIN, work=root / "work", model="eager")
    with running_server(root / "run", store) as running:
        yield running


ROW = [0.5] * 16


@pytest.mark.parametrize("path", ["/explanations/explaining", "/explanations/explaining/1.0"])
def test_explanations_call_get_insights_with_row_zero(server: Server, path: str) -> None:
    response = server.post(path, data={"data": json.dumps(ROW), "target": "3"})  # a form: its fields are the row
    assert response.status_code == 200, response.text
    assert response.json() == {"sum": 8.0, "raw": ROW, "target": 3, "explain": "True"}


def test_explanations_of_a_body_pass_it_whole_with_target_zero(server: Server) -> None:
    response = server.post("/explanations/explaining", json=ROW)
    assert response.status_code == 200, response.text
    assert response.json() == {"sum": 8.0, "raw": ROW, "target": 0, "explain": "True"}


def test_predictions_do_not_explain(server: Server) -> None:
    response = server.post("/predictions/explaining", json=ROW)
    assert response.status_code == 200, response.text
    assert all(isinstance(x, float) for x in response.json())  # the MLP's outputs, not an explanation


def test_kserve_explain_routes_explain_without_envelope(server: Server) -> None:
    for path in ("/v1/models/explaining:explain", "/v2/models/explaining/explain"):
        response = server.post(path, json=ROW)
        assert response.status_code == 200, (path, response.text)
        assert response.json()["target"] == 0


def test_explanations_of_a_handler_without_get_insights_say_so(server: Server) -> None:
    response = server.post("/explanations/plain", json=ROW)
    assert response.status_code == 500
    assert "get_insights" in response.text


def test_explanations_of_an_unknown_model_are_404(server: Server) -> None:
    assert server.post("/explanations/nope", json=ROW).status_code == 404
