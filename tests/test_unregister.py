"""Unregistering within ``unregister_model_timeout`` (issue 14.5), end to end: queued and running requests may finish
within it; past it, the workers are killed and the answer is TorchServe's 408, and the model stays registered with no
workers (as TorchServe keeps it) until another unregister removes it."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers import Server, children_of, make_archive, running_server

# "sleepN" in the body makes it take N seconds.
SLEEPER = """
import time


def handle(data, context):
    if data is None:
        return None
    for row in data:
        body = bytes(row.get("body") or b"").decode()
        if body.startswith("sleep"):
            time.sleep(float(body[5:]))
    return ["done"] * len(data)
"""

TIMEOUT_S = 1.0


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("unregister")
    store = root / "store"
    store.mkdir()
    make_archive(store, "sleeper", SLEEPER, work=root / "work")
    return store


@pytest.fixture(scope="module")
def server(store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    config = {"unregister_model_timeout": str(TIMEOUT_S)}
    args = ("--disable-token-auth", "--ncs", "--enable-model-api")
    with running_server(tmp_path_factory.mktemp("run"), store, ("base=sleeper.mar",), config, args) as srv:
        yield srv


def call(server: Server, method: str, path: str, **kwargs: Any) -> httpx.Response:
    return httpx.request(method, server.management + path, timeout=60, **kwargs)


def register(server: Server, name: str) -> set[int]:
    params = {"url": "sleeper.mar", "model_name": name, "initial_workers": "1"}
    assert call(server, "POST", "/models", params=params).status_code == 200
    [model] = call(server, "GET", f"/models/{name}").json()
    return {w["pid"] for w in model["workers"]}


def staging_of(server: Server, pid: int) -> Path:
    cwd = Path(f"/proc/{pid}/cwd").resolve()
    return next(p for p in cwd.parents if p.name.startswith("servekit-model-"))


def test_unregister_within_the_timeout_is_200_and_lets_running_requests_finish(server: Server) -> None:
    [pid] = register(server, "quick")
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(server.post, "/predictions/quick", content=b"sleep0.5")
        time.sleep(0.2)
        deleted = call(server, "DELETE", "/models/quick", params={"synchronous": "false"})  # ignored, as by TorchServe
        assert deleted.json() == {"status": 'Model "quick" unregistered'}
        assert (running.result().status_code, running.result().text) == (200, "done")
    assert pid not in children_of(server.process.pid)
    assert call(server, "GET", "/models/quick").status_code == 404


def test_unregister_past_the_timeout_is_408_and_keeps_the_model_without_workers(server: Server) -> None:
    [pid] = register(server, "stuck")
    staging = staging_of(server, pid)
    with ThreadPoolExecutor(3) as pool:
        first = pool.submit(server.post, "/predictions/stuck", content=b"sleep0.5")
        time.sleep(0.1)
        running = pool.submit(server.post, "/predictions/stuck", content=b"sleep30")
        time.sleep(0.1)
        # queued behind it: sent to the worker with it when the first is done (a worker holds two batches)
        behind = pool.submit(server.post, "/predictions/stuck", content=b"x")
        assert first.result().text == "done"
        time.sleep(0.3)
        started = time.monotonic()
        deleted = call(server, "DELETE", "/models/stuck")
        took = time.monotonic() - started
        assert deleted.status_code == 408, deleted.text
        assert deleted.json() == {
            "code": 408,
            "type": "RequestTimeoutException",
            "message": "Timed out while cleaning resources: stuck",
        }
        assert TIMEOUT_S - 0.1 < took < TIMEOUT_S + 5
        # the worker was killed: what it ran and what waited behind it are answered, none waits for ever
        assert running.result(timeout=10).status_code == 500
        assert behind.result(timeout=10).status_code == 503
    assert pid not in children_of(server.process.pid)
    # as TorchServe keeps it: registered, with no workers, its files in place
    [model] = call(server, "GET", "/models/stuck").json()
    assert (model["minWorkers"], model["maxWorkers"], model["workers"]) == (0, 0, [])
    assert "stuck" in [m["modelName"] for m in call(server, "GET", "/models").json()["models"]]
    assert staging.is_dir()
    refused = server.post("/predictions/stuck", content=b"x")
    assert refused.status_code == 503 and "has no worker" in refused.json()["message"], refused.text
    # it can serve again, and another unregister removes it
    scaled = call(server, "PUT", "/models/stuck", params={"min_worker": "1", "synchronous": "true"})
    assert scaled.status_code == 200, scaled.text
    assert server.post("/predictions/stuck", content=b"x").text == "done"
    assert call(server, "DELETE", "/models/stuck").json() == {"status": 'Model "stuck" unregistered'}
    assert call(server, "GET", "/models/stuck").status_code == 404
    assert not staging.exists()


def test_unregister_of_a_model_without_workers_is_200_at_once(server: Server) -> None:
    params = {"url": "sleeper.mar", "model_name": "none", "initial_workers": "0"}
    assert call(server, "POST", "/models", params=params).status_code == 200
    assert call(server, "DELETE", "/models/none").json() == {"status": 'Model "none" unregistered'}
    assert call(server, "GET", "/models/none").status_code == 404
