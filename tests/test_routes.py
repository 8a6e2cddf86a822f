"""TorchServe's other inference routes: ``/predictions/{m}/{v}/{rest}`` (``url_path``), SageMaker's
``/invocations`` and ``/models/{m}/invoke``, the legacy ``/{m}/predict``, and the ``OPTIONS`` descriptions."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.helpers import Server, make_archive, running_server

INSPECT = """
class Inspect:
    def initialize(self, context):
        self.initialized = True

    def handle(self, data, context):
        out = []
        for idx, row in enumerate(data):
            fields = {k: bytes(v).decode() if isinstance(v, (bytes, bytearray)) else v for k, v in row.items()}
            headers = {n: context.get_request_header(idx, n) for n in ("url_path", "explain")}
            out.append({"fields": fields, "headers": headers, "model": context.manifest["model"]["modelName"]})
        return out
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("routes")
    store = root / "store"
    store.mkdir()
    for name in ("inspect", "other"):
        make_archive(store, name, INSPECT, work=root / "work")
    with running_server(root / "run", store) as server:
        yield server


def answer(response: httpx.Response) -> dict[str, object]:
    assert response.status_code == 200, response.text
    result = json.loads(response.content)
    assert isinstance(result, dict)
    return result


def test_routes_rest_of_predictions_path_reaches_handler_as_url_path(server: Server) -> None:
    result = answer(server.post("/predictions/inspect/1.0/v1/extra/", content=b"u"))
    assert result["headers"] == {"url_path": "v1/extra", "explain": "False"}
    assert result["fields"] == {"body": "u"}


def test_routes_plain_predictions_send_empty_url_path(server: Server) -> None:
    assert answer(server.post("/predictions/inspect/1.0", content=b"u"))["headers"] == {
        "url_path": "",
        "explain": "False",
    }


def test_routes_invocations_picks_model_from_query_and_passes_query_as_inputs(server: Server) -> None:
    result = answer(server.post("/invocations?model_name=other&x=1", content=b"s"))
    assert result["model"] == "other"
    assert result["fields"] == {"model_name": "other", "x": "1", "body": "s"}
    assert result["headers"] == {"url_path": None, "explain": None}  # TorchServe adds neither here


def test_routes_invocations_takes_model_name_from_form_input(server: Server) -> None:
    result = answer(server.post("/invocations", data={"model_name": "inspect", "a": "b"}))
    assert result["model"] == "inspect"
    assert result["fields"] == {"model_name": "inspect", "a": "b"}


def test_routes_invocations_without_model_name_is_400(server: Server) -> None:
    response = server.post("/invocations", content=b"s")  # two models loaded at startup: none is implied
    assert response.status_code == 400
    assert response.json()["message"] == "Parameter model_name is required."


def test_routes_sagemaker_invoke_and_legacy_predict_serve_the_named_model(server: Server) -> None:
    assert answer(server.post("/models/other/invoke", content=b"s"))["model"] == "other"
    assert answer(server.post("/other/predict?q=2", content=b"l"))["fields"] == {"q": "2", "body": "l"}
    assert answer(server.post("/other/1.0/predict", content=b"l"))["model"] == "other"
    assert server.post("/missing/predict", content=b"l").status_code == 404


def test_routes_options_describe_the_api_and_one_model(server: Server) -> None:
    root = httpx.options(server.inference + "/")
    assert root.status_code == 200 and "paths" in root.json()
    model = httpx.options(server.inference + "/predictions/inspect")
    assert model.status_code == 200
    assert model.json()["info"]["title"] == "RESTful API for: inspect"
    assert httpx.options(server.inference + "/predictions/missing").status_code == 404
    assert httpx.options(server.management + "/").status_code == 200
    assert httpx.get(server.inference + "/").status_code == 405


def test_routes_invocations_implies_the_only_startup_model(tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    make_archive(store, "inspect", INSPECT, work=tmp_path / "work")
    with running_server(tmp_path / "run", store) as server:
        assert answer(server.post("/invocations", content=b"s"))["model"] == "inspect"
