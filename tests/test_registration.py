"""Registration semantics as TorchServe 0.12 has them (issue 14): a `POST /models` that names no `initial_workers`
registers the model with the workers of its model-config YAML, else `default_workers_per_model` if the configuration
sets it, else none (200, even with `synchronous=false`), so a handler that cannot load only fails when the model is
scaled; such models survive a restart through the snapshot. A JSON body may use what TorchServe's lenient JSON
parser accepts (single quotes, unquoted names, comments). Real servers, real archives, real HTTP."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers import Server, make_archive, running_server

HANDLER = """
def handle(data, context):
    if data is None:
        return None
    return ["ok"] * len(data)
"""

BROKEN_HANDLER = """
raise RuntimeError("cannot import this handler: boom-17")
"""

ARGS = ("--disable-token-auth", "--ncs", "--enable-model-api")
NO_WORKERS = "registered with 0 initial workers. Use scale workers API to add workers for the model."


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("registration")
    store, work = root / "store", root / "work"
    store.mkdir()
    make_archive(store, "plain", HANDLER, work=work)
    make_archive(store, "broken", BROKEN_HANDLER, work=work)
    make_archive(store, "sized", HANDLER, work=work, config="minWorkers: 1\nmaxWorkers: 2\n")
    make_archive(store, "idle", HANDLER, work=work, config="minWorkers: 0\n")  # a startup model with no worker
    return store


@pytest.fixture(scope="module")
def server(store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with running_server(tmp_path_factory.mktemp("run"), store, ("idle.mar",), args=ARGS) as srv:
        yield srv


def call(server: Server, method: str, path: str, **kwargs: Any) -> httpx.Response:
    return httpx.request(method, server.management + path, timeout=60, **kwargs)


def register_json(server: Server, body: bytes, content_type: str = "application/json") -> httpx.Response:
    return call(server, "POST", "/models", content=body, headers={"content-type": content_type})


def described(server: Server, name: str) -> dict[str, Any]:
    response = call(server, "GET", f"/models/{name}")
    assert response.status_code == 200, response.text
    [model] = response.json()
    assert isinstance(model, dict)
    return model


def test_registration_without_initial_workers_starts_no_worker(server: Server) -> None:
    response = call(server, "POST", "/models", params={"url": "plain.mar", "model_name": "zero"})
    try:
        assert response.status_code == 200, response.text
        assert response.json() == {"status": f'Model "zero" Version: 1.0 {NO_WORKERS}'}
        model = described(server, "zero")
        assert (model["minWorkers"], model["maxWorkers"], model["workers"]) == (0, 0, [])
        refused = httpx.post(server.inference + "/predictions/zero", content=b"x", timeout=10)
        assert refused.status_code == 503 and "has no worker" in refused.json()["message"]
        assert httpx.get(server.inference + "/ping", timeout=10).json() == {"status": "Healthy"}
        scaled = call(server, "PUT", "/models/zero", params={"min_worker": "1", "synchronous": "true"})
        assert scaled.json() == {"status": "Workers scaled to 1 for model: zero"}
        assert httpx.post(server.inference + "/predictions/zero", content=b"x", timeout=60).text == "ok"
    finally:
        call(server, "DELETE", "/models/zero")


def test_registration_without_workers_is_200_even_when_asynchronous(server: Server) -> None:
    params = {"url": "plain.mar", "model_name": "later", "synchronous": "false"}
    response = call(server, "POST", "/models", params=params)
    try:
        assert response.status_code == 200, response.text
        assert response.json() == {"status": f'Model "later" Version: 1.0 {NO_WORKERS}'}
        assert described(server, "later")["workers"] == []  # registered before the answer
    finally:
        call(server, "DELETE", "/models/later")


def test_registration_of_an_unloadable_handler_succeeds_and_scaling_it_fails(server: Server) -> None:
    response = call(server, "POST", "/models", params={"url": "broken.mar"})
    try:
        assert response.status_code == 200, response.text
        assert response.json() == {"status": f'Model "broken" Version: 1.0 {NO_WORKERS}'}
        scaled = call(server, "PUT", "/models/broken", params={"min_worker": "1", "synchronous": "true"})
        assert scaled.status_code == 500 and "boom-17" in scaled.json()["message"]
        model = described(server, "broken")  # still registered, as it was
        assert (model["minWorkers"], model["workers"]) == (0, [])
    finally:
        assert call(server, "DELETE", "/models/broken").json() == {"status": 'Model "broken" unregistered'}


def test_registration_without_initial_workers_takes_the_model_config_workers(server: Server) -> None:
    response = call(server, "POST", "/models", params={"url": "sized.mar", "synchronous": "true"})
    try:
        assert response.json() == {"status": 'Model "sized" Version: 1.0 registered with 1 initial workers'}
        model = described(server, "sized")
        assert (model["minWorkers"], model["maxWorkers"], len(model["workers"])) == (1, 2, 1)
    finally:
        call(server, "DELETE", "/models/sized")


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        # TorchServe's own ModelServerTest registers with this body
        (b"{'url':'plain.mar', 'model_name':'lenient', 'batch_size':'3', 'synchronous':'true'}", "application/json"),
        (b"{url: plain.mar; model_name => 'lenient', # a comment\n batch_size = 3}", "application/json"),
        (
            b"/* c */ {'url': \"plain.mar\", 'model_name': 'lenient', 'batch_size': 3.0}",
            "Application/JSON; charset=utf-8",
        ),
    ],
)
def test_registration_json_body_accepts_what_torchserve_reads_leniently(
    server: Server, body: bytes, content_type: str
) -> None:
    response = register_json(server, body, content_type)
    try:
        assert response.status_code == 200, response.text
        assert response.json() == {"status": f'Model "lenient" Version: 1.0 {NO_WORKERS}'}
        assert described(server, "lenient")["batchSize"] == 3
    finally:
        call(server, "DELETE", "/models/lenient")


def test_registration_json_body_keeps_quotes_and_escapes_of_single_quoted_strings(server: Server) -> None:
    response = register_json(server, b"{'url': 'plain.mar', 'model_name': 'it\\'s \"x\"\\u0021'}")
    try:
        assert response.json() == {"status": f'Model "it\'s "x"!" Version: 1.0 {NO_WORKERS}'}
    finally:
        assert call(server, "DELETE", '/models/it\'s "x"!').status_code == 200


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (b"{'url':", "Invalid JSON body"),
        (b"{'url': 'plain.mar', 'model_name': 'x',}", "Invalid JSON body"),  # Gson refuses a trailing comma too
        (b"{'url': 'plain.mar', 'model_name': 'x\\q'}", "Invalid JSON body"),
        (b"['plain.mar']", "must be an object"),
        (b"{'url': 'plain.mar', 'batch_size': 1.5}", "batch_size"),
        (b"{'url': 'plain.mar', 'initial_workers': true}", "initial_workers"),
    ],
)
def test_registration_json_body_refuses_what_is_not_lenient_json_with_400(
    server: Server, body: bytes, words: str
) -> None:
    response = register_json(server, body)
    assert response.status_code == 400, response.text
    assert words in response.json()["message"]
    assert [m["modelName"] for m in call(server, "GET", "/models").json()["models"]] == ["idle"]


def test_registration_snapshot_keeps_models_without_workers_and_a_configured_default_applies(
    store: Path, tmp_path: Path
) -> None:
    workdir = tmp_path / "run"
    snapshots = ("--disable-token-auth", "--enable-model-api")
    with running_server(workdir, store, ("idle.mar",), args=snapshots) as server:
        for url in ("plain.mar", "broken.mar"):
            assert call(server, "POST", "/models", params={"url": url}).status_code == 200
    saved = json.loads((workdir / "logs" / "config" / "snapshot.json").read_text())["models"]
    assert {n: (v["1.0"]["minWorkers"], v["1.0"]["maxWorkers"]) for n, v in saved.items()} == {
        "broken": (0, 0),
        "idle": (0, 0),
        "plain": (0, 0),
    }
    # restarted with a configured default_workers_per_model: the restored models keep their 0 workers, and a new
    # registration that names no initial_workers gets the configured count, as in TorchServe
    config = {"default_workers_per_model": "1"}
    with running_server(workdir, store, ("idle.mar",), config, snapshots) as server:
        for name in ("plain", "broken", "idle"):
            model = described(server, name)
            assert (model["minWorkers"], model["workers"]) == (0, []), name
        refused = httpx.post(server.inference + "/predictions/plain", content=b"x", timeout=10)
        assert refused.status_code == 503
        again = call(server, "POST", "/models", params={"url": "plain.mar", "model_name": "one"})
        assert again.json() == {"status": 'Model "one" Version: 1.0 registered with 1 initial workers'}
        assert httpx.post(server.inference + "/predictions/one", content=b"x", timeout=60).text == "ok"
