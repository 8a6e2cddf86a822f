"""TorchServe's exact answers (issue 14), where the differential test (tests/compat) found servekit's own words: a
``PredictionException``'s or ``MemoryError``'s message alone, the set-default and no-worker 404/503 messages, the
caching headers on every answer (replacing a handler's), and the TorchServe latency metrics counting only the
requests a worker answered, per the version the URL named. What TorchServe 0.12 answers, observed, is in each
test's docstring."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

import httpx
import pytest

from tests.helpers import Server, make_archive, running_server

# What the request's body says: raise one of TorchServe's answers, or set the headers of a JSON body.
HANDLER = """
import json

from ts.utils.util import PredictionException


class Exact:
    def initialize(self, context):
        self.initialized = True

    def handle(self, data, context):
        body = bytes(data[0].get("body") or b"").decode()
        if body == "prediction":
            raise PredictionException("bad input", 418)
        if body == "prediction500":
            raise PredictionException("the model says no", 500)
        if body == "memory":
            raise MemoryError()
        if body == "runtime":
            raise RuntimeError("boom")
        if body.startswith("{"):
            for name, value in json.loads(body).items():
                context.set_response_header(0, name, value)
        return ["ok" for _ in data]
"""

NO_CACHE = {
    "cache-control": "no-cache; no-store, must-revalidate, private",
    "pragma": "no-cache",
    "expires": "Thu, 01 Jan 1970 00:00:00 UTC",
}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("exact-answers")
    store = root / "store"
    store.mkdir()
    make_archive(store, "exact", HANDLER, work=root / "work", config="minWorkers: 1\n")
    make_archive(store, "idle", HANDLER, work=root / "work", config="minWorkers: 0\n")
    make_archive(store, "failing", HANDLER, work=root / "work", config="minWorkers: 1\n")  # sent "runtime" only
    args = ("--disable-token-auth", "--ncs", "--enable-model-api")
    with running_server(root / "run", store, ("exact.mar", "idle.mar", "failing.mar"), args=args) as srv:
        yield srv


def post(server: Server, body: str, path: str = "/predictions/exact") -> httpx.Response:
    return server.post(path, content=body.encode(), headers={"content-type": "application/octet-stream"})


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ("prediction", 418, "bad input"),
        ("prediction500", 500, "the model says no"),
        ("memory", 507, "Out of resources"),
    ],
)
def test_prediction_exception_and_memory_error_send_the_message_alone(
    server: Server, body: str, status: int, message: str
) -> None:
    """TorchServe: ``{"code": 400, "type": "InternalServerException", "message": "bad input"}`` for
    ``PredictionException("bad input", 400)``, ``"Out of resources"`` (507) for ``MemoryError``."""
    response = post(server, body)
    assert response.status_code == status, response.text
    assert response.json() == {"code": status, "type": "InternalServerException", "message": message}


def test_any_other_exception_still_names_the_model_and_its_type(server: Server) -> None:
    response = post(server, "runtime")
    assert response.status_code == 500, response.text
    assert response.json()["message"] == "Prediction failed for model exact: RuntimeError: boom"


def test_set_default_of_an_unknown_version_has_torchserve_words(server: Server) -> None:
    """TorchServe: ``Model version 9.9 does not exist for model exact`` (no colons, unlike its other 404s)."""
    response = httpx.put(server.management + "/models/exact/9.9/set-default", timeout=10)
    assert response.status_code == 404, response.text
    message = "Model version 9.9 does not exist for model exact"
    assert response.json() == {"code": 404, "type": "ModelVersionNotFoundException", "message": message}
    elsewhere = httpx.get(server.management + "/models/exact/9.9", timeout=10).json()["message"]
    assert elsewhere == "Model version: 9.9 does not exist for model: exact"
    assert httpx.put(server.management + "/models/nope/1.0/set-default", timeout=10).json()["message"] == (
        "Model not found: nope"
    )


def test_no_worker_503_has_torchserve_words(server: Server) -> None:
    """TorchServe's message goes on about sequence batching, which servekit has not; scripts match it whole."""
    response = post(server, "x", "/predictions/idle")
    assert response.status_code == 503, response.text
    message = (
        'Model "idle" has no worker to serve inference request. Please use scale workers API to add workers. '
        "If this is a sequence inference, please check if it is closed, or expired; or exceeds "
        "maxSequenceJobQueueSize"
    )
    assert response.json() == {"code": 503, "type": "ServiceUnavailableException", "message": message}


@pytest.mark.parametrize("headers", [{"Cache-Control": "max-age=60"}, {"pragma": "x"}, {"Expires": "y", "X-A": "1"}])
def test_a_caching_header_set_by_the_handler_gives_torchserve_no_cache_headers(
    server: Server, headers: dict[str, str]
) -> None:
    """TorchServe sends ``Pragma``, ``Cache-Control`` and ``Expires`` with its own values, whatever the handler set."""
    response = post(server, json.dumps(headers))
    assert response.status_code == 200, response.text
    assert {name: response.headers.get_list(name) for name in NO_CACHE} == {k: [v] for k, v in NO_CACHE.items()}
    assert response.headers.get("x-a") == headers.get("X-A")


def test_without_a_caching_header_from_the_handler_torchserve_no_cache_headers_are_sent_too(server: Server) -> None:
    """TorchServe's ``sendHttpResponse`` sets them on every answer."""
    response = post(server, "{}")
    assert response.status_code == 200, response.text
    assert {name: response.headers.get_list(name) for name in NO_CACHE} == {k: [v] for k, v in NO_CACHE.items()}


def series(server: Server, name: str) -> set[tuple[str, str]]:
    """The (model_name, model_version) of each sample of one of TorchServe's families."""
    text = httpx.get(f"{server.metrics}/metrics", params={"name[]": name}, timeout=10).text
    pattern = rf'^{name}\{{model_name="([^"]*)",model_version="([^"]*)",hostname="[^"]*",\}} \S+$'
    return {(m[1], m[2]) for m in re.finditer(pattern, text, flags=re.MULTILINE)}


def test_torchserve_latency_families_count_what_a_worker_answered_by_url_version(server: Server) -> None:
    """TorchServe adds to ``ts_inference_latency_microseconds`` and ``ts_queue_latency_microseconds`` only when a
    worker answers, labelled with the version the URL named; ``ts_inference_requests_total`` counts every request."""
    assert [post(server, "runtime", "/predictions/failing").status_code for _ in range(2)] == [500, 500]
    assert post(server, "x", "/predictions/exact/1.0").status_code == 200
    assert ("failing", "default") in series(server, "ts_inference_requests_total")
    for family in ("ts_inference_latency_microseconds", "ts_queue_latency_microseconds"):
        found = series(server, family)
        assert ("exact", "1.0") in found, family
        assert not any(model == "failing" for model, _ in found), family
