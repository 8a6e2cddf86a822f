"""Server lifecycle: /ping is Unhealthy until the startup models are loaded, a model that fails to load does not
stop the others, SIGTERM ends the server and its workers with exit code 0."""

from __future__ import annotations

import time
from pathlib import Path

import httpx

from tests.helpers import TS_HANDLER_PY, children_of, make_archive, running_server, stop_process

SLOW_INIT_HANDLER = """
import time


def handle(data, context):
    if data is None:
        time.sleep(3)  # a slow model load
        return None
    return ["ok"] * len(data)
"""

BROKEN_HANDLER = """
def handle(data, context):
    raise RuntimeError("cannot load this model")
"""


def test_server_ping_unhealthy_until_startup_models_load_then_healthy(tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    make_archive(store, "slow", SLOW_INIT_HANDLER, work=tmp_path / "work")
    with running_server(tmp_path / "run", store, wait=False) as server:
        seen = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                response = httpx.get(server.inference + "/ping", timeout=2)
            except httpx.TransportError:
                time.sleep(0.05)
                continue
            seen.append((response.status_code, response.json()))
            if response.status_code == 200:
                break
            time.sleep(0.05)
        assert (500, {"status": "Unhealthy"}) in seen
        assert seen[-1] == (200, {"status": "Healthy"})
        assert server.post("/predictions/slow", content=b"x").text == "ok"


def test_server_keeps_serving_when_one_startup_model_fails_to_load(tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    make_archive(store, "good", TS_HANDLER_PY, work=tmp_path / "work", model="eager")
    make_archive(store, "broken", BROKEN_HANDLER, work=tmp_path / "work")
    with running_server(tmp_path / "run", store) as server:
        assert server.post("/predictions/good", json={"data": [0.0] * 16}).status_code == 200
        assert server.post("/predictions/broken", content=b"x").status_code == 404
        log = server.log_text()
        assert "broken" in log and "cannot load this model" in log


def test_server_sigterm_stops_workers_and_exits_zero(tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    make_archive(store, "mlp", TS_HANDLER_PY, work=tmp_path / "work", model="eager", config="minWorkers: 2\n")
    with running_server(tmp_path / "run", store) as server:
        workers = children_of(server.process.pid)
        assert len(workers) == 2
        stop_process(server.process)
        assert server.process.returncode == 0
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(Path(f"/proc/{pid}").exists() for pid in workers):
            time.sleep(0.1)
        assert not any(Path(f"/proc/{pid}").exists() for pid in workers)


def test_server_serves_the_bundled_example_models(tmp_path: Path) -> None:
    store = Path(__file__).parent.parent / "model_store"
    with running_server(tmp_path / "run", store) as server:
        body = {"data": [float(i) for i in range(16)]}
        eager = server.post("/predictions/mlp", json=body)
        scripted = server.post("/predictions/mlp_scripted", json=body)
        assert eager.status_code == 200 and scripted.status_code == 200
        assert len(eager.json()) == 4
        assert scripted.json() == eager.json()
        assert server.post("/predictions/mlp", json={"nodata": 1}).status_code == 400


HANGING_INIT_HANDLER = """
import time


def handle(data, context):
    if data is None:
        time.sleep(600)
    return ["never"]
"""


def test_server_model_hanging_in_initialize_fails_within_startup_timeout(tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    make_archive(store, "good", TS_HANDLER_PY, work=tmp_path / "work", model="eager")
    make_archive(store, "stuck", HANGING_INIT_HANDLER, work=tmp_path / "work", config="startupTimeout: 2\n")
    with running_server(tmp_path / "run", store) as server:
        assert server.post("/predictions/good", json={"data": [0.0] * 16}).status_code == 200
        assert server.post("/predictions/stuck", content=b"x").status_code == 404
        assert "did not load within startup_timeout=2s" in server.log_text()
        assert len(children_of(server.process.pid)) == 1  # the stuck worker was killed
