"""``GET /models/{m}?customized=true`` end to end (issue 14.5): the handler's ``describe_handle`` runs in a worker and
its answer becomes the describe's ``customizedMetadata``, as TorchServe 0.12 answers (checked against it by
tests/compat); 503 while the model has no worker."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from tests.helpers import Server, make_archive, running_server

# A TorchServe handler (ts imports) whose describe_handle answers what the request's x-kind header asks for.
DESCRIBED = """
import json
import time

from ts.torch_handler.base_handler import BaseHandler

VALUES = {
    "dict": {"kind": "dict", "nested": {"n": [1, None]}},
    "jsontext": json.dumps({"kind": "jsontext"}),
    "bytes": b'{"kind": "bytes"}',
    "text": "plain text",
    "none": None,
    "list": [1, 2],
    "empty": "",
    "nulls": {"kind": "nulls", "gone": None, "inner": {"gone": None, "kept": [None]}},
}


class Described(BaseHandler):
    def initialize(self, context):
        self.manifest = context.manifest
        self.initialized = True

    def preprocess(self, data):
        return data

    def inference(self, data):
        for row in data:
            body = bytes(row.get("body") or b"").decode()
            if body.startswith("sleep"):
                time.sleep(float(body[5:]))
        return data

    def postprocess(self, data):
        return ["predicted" for _ in data]

    def describe_handle(self):
        kind = self.context.get_request_header(0, "x-kind") or "dict"
        if kind == "raise":
            raise RuntimeError("cannot describe")
        if kind == "status":
            self.context.set_response_status(299, "Described")
            self.context.set_response_content_type(0, "application/x-described")
            self.context.set_response_header(0, "X-Described", "yes")
            return {"kind": "status"}
        return VALUES[kind]
"""

# A BaseHandler that does not override describe_handle.
PLAIN = """
from ts.torch_handler.base_handler import BaseHandler


class Plain(BaseHandler):
    def initialize(self, context):
        self.initialized = True
"""

# A module-level handle(): it is called for a describe too, with one empty input and the describe header.
FUNCTION = """
def handle(data, context):
    if data is None:
        return None
    headers = context.get_all_request_header(0)
    return [{"data": repr(data), "describe": headers.get("describe"), "probe": headers.get("x-probe")}]
"""

ONE_WORKER = "minWorkers: 1\nmaxWorkers: 1\n"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("customized")
    store, work = root / "store", root / "work"
    store.mkdir()
    make_archive(store, "described", DESCRIBED, work=work, config=ONE_WORKER)
    make_archive(store, "plain", PLAIN, work=work, config=ONE_WORKER)
    make_archive(store, "function", FUNCTION, work=work, config=ONE_WORKER)
    make_archive(store, "idle", DESCRIBED, work=work, config="minWorkers: 0\n")
    with running_server(root / "run", store, ("all",)) as srv:
        yield srv


def describe(server: Server, path: str, kind: str | None = None, **headers: str) -> httpx.Response:
    if kind is not None:
        headers["x-kind"] = kind
    return httpx.get(server.management + path, headers=headers, timeout=60)


def only(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 200, response.text
    [model] = response.json()
    assert isinstance(model, dict)
    return model


def test_customized_describe_adds_the_handlers_metadata_to_the_describe(server: Server) -> None:
    plain = only(describe(server, "/models/described"))
    assert "customizedMetadata" not in plain
    response = describe(server, "/models/described?customized=true")
    customized = only(response)
    assert customized.pop("customizedMetadata") == {"kind": "dict", "nested": {"n": [1, None]}}
    assert customized.keys() == plain.keys() and customized["modelName"] == "described"
    assert response.headers["content-type"] == "application/json" and response.headers["x-request-id"]
    assert only(describe(server, "/models/described/1.0?customized=true"))["customizedMetadata"]["kind"] == "dict"
    assert only(describe(server, "/models/described?customized=TRUE"))["customizedMetadata"]["kind"] == "dict"


@pytest.mark.parametrize("query", ["", "?customized=false", "?customized="])
def test_customized_describe_is_not_asked_without_customized_true(server: Server, query: str) -> None:
    assert "customizedMetadata" not in only(describe(server, "/models/described" + query, "raise"))


def test_customized_describe_of_all_versions_is_the_plain_describe(server: Server) -> None:
    response = describe(server, "/models/described/all?customized=true", "raise")
    assert response.status_code == 200, response.text
    assert ["customizedMetadata" in m for m in response.json()] == [False]


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("jsontext", {"kind": "jsontext"}),  # the JSON text of an object, as TorchServe's own examples return
        ("bytes", {"kind": "bytes"}),
        ("text", {}),  # anything but an object shows as {}, as in TorchServe
        ("none", {}),
        ("list", {}),
        ("nulls", {"kind": "nulls", "inner": {"kept": [None]}}),  # as TorchServe writes it again (Gson)
    ],
)
def test_customized_describe_reads_the_answer_as_torchserve_does(
    server: Server, kind: str, expected: dict[str, Any]
) -> None:
    assert only(describe(server, "/models/described?customized=true", kind))["customizedMetadata"] == expected


def test_customized_describe_of_an_empty_answer_has_no_metadata(server: Server) -> None:
    assert "customizedMetadata" not in only(describe(server, "/models/described?customized=true", "empty"))


def test_customized_describe_sends_the_status_and_headers_the_handler_set(server: Server) -> None:
    response = describe(server, "/models/described?customized=true", "status")
    assert response.status_code == 299
    assert response.headers["content-type"] == "application/x-described"
    assert response.headers["x-described"] == "yes"
    [model] = response.json()
    assert model["customizedMetadata"] == {"kind": "status"}


def test_customized_describe_of_a_failing_handler_is_its_error_and_the_worker_serves_on(server: Server) -> None:
    response = describe(server, "/models/described?customized=true", "raise")
    assert response.status_code == 500
    body = response.json()
    assert body["type"] == "InternalServerException" and "RuntimeError: cannot describe" in body["message"]
    assert server.post("/predictions/described", content=b"x").text == "predicted"
    assert only(describe(server, "/models/described?customized=true"))["customizedMetadata"]["kind"] == "dict"


def test_customized_describe_of_a_base_handler_without_describe_handle_is_empty(server: Server) -> None:
    assert only(describe(server, "/models/plain?customized=true"))["customizedMetadata"] == {}


def test_customized_describe_calls_a_function_handler_with_one_empty_input(server: Server) -> None:
    metadata = only(describe(server, "/models/function?customized=true", **{"X-Probe": "v"}))["customizedMetadata"]
    assert metadata == {"data": "[{}]", "describe": "True", "probe": "v"}
    # an inference request is not a describe
    assert server.post("/predictions/function", content=b"x").json()["describe"] is None


def test_customized_describe_without_a_worker_is_503(server: Server) -> None:
    message = 'Model "idle" has no worker to serve describe request. Please use scale workers API to add workers.'
    for path in ("/models/idle?customized=true", "/models/idle/1.0?customized=true"):
        response = describe(server, path)
        assert response.status_code == 503, response.text
        assert response.json() == {"code": 503, "type": "ServiceUnavailableException", "message": message}
    assert "customizedMetadata" not in only(describe(server, "/models/idle"))


def test_customized_describe_refuses_a_customized_that_is_not_a_boolean(server: Server) -> None:
    response = describe(server, "/models/described?customized=maybe")
    assert response.status_code == 400
    assert "customized" in response.json()["message"]


def test_customized_describe_of_unknown_models_is_404(server: Server) -> None:
    assert describe(server, "/models/missing?customized=true").status_code == 404
    assert describe(server, "/models/described/9.9?customized=true").status_code == 404


def test_customized_describe_runs_ahead_of_the_requests_queued(server: Server) -> None:
    """With its one worker busy and requests queued, the describe takes the worker before the requests that wait
    (a worker holds at most the batch it runs and the next one)."""
    done: dict[str, float] = {}

    def predict(i: int) -> None:
        response = server.post("/predictions/described", content=b"sleep0.8")
        assert response.text == "predicted"
        done[f"request{i}"] = time.monotonic()

    with ThreadPoolExecutor(5) as pool:
        requests = []
        for i in range(4):
            requests.append(pool.submit(predict, i))
            time.sleep(0.1)  # in this order
        customized = only(describe(server, "/models/described?customized=true"))
        done["describe"] = time.monotonic()
        for future in requests:
            future.result()
    assert customized["customizedMetadata"]["kind"] == "dict"
    assert done["describe"] < done["request3"], done
