"""Worker faults and shutdown, injected for real: signals to worker processes, hung and lying handlers, SIGTERM
under load, a front end killed outright. After each fault the server must answer every request once, say what
went wrong, and serve normally again."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.helpers import Server, children_of, make_archive, running_server

FAULTY_HANDLER = """
import os
import signal
import sys
import time


def handle(data, context):
    if data is None:
        return None
    out = []
    for row in data:
        action = row["body"]
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if action == "segv":
            os.kill(os.getpid(), signal.SIGSEGV)
        if action == "hang":
            time.sleep(60)
        if action == "garbage":  # a frame whose header is not JSON, straight onto the front end's socket
            fd = int(sys.argv[sys.argv.index("--fd") + 1])
            os.write(fd, b"\\x00\\x00\\x00\\x0c\\x00\\x00\\x00\\x04junkjunk")
            time.sleep(5)
        if action == "huge":
            out.append(b"x" * 300_000)
            continue
        if action.startswith("slow"):
            time.sleep(0.4)
        out.append({"pid": os.getpid(), "echo": action})
    return out
"""

CRASH_HANDLER = """
import os
import signal


def handle(data, context):
    if data is not None:
        os.kill(os.getpid(), signal.SIGKILL)
"""


def post(server: Server, model: str, action: str, **kwargs: object) -> httpx.Response:
    headers = {"content-type": "text/plain"}
    return server.post(f"/predictions/{model}", content=action.encode(), headers=headers, **kwargs)


def worker_pids(server: Server, model: str) -> list[int]:
    workers = httpx.get(f"{server.management}/models/{model}").json()[0]["workers"]
    return sorted(w["pid"] for w in workers if w["status"] == "READY")


def wait_for(condition: object, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return
        time.sleep(0.1)
    raise AssertionError("condition not reached")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("faults")
    store = root / "store"
    store.mkdir()
    config = "minWorkers: 2\nbatchSize: 1\nresponseTimeout: 2\n"
    make_archive(store, "faulty", FAULTY_HANDLER, work=root / "work", config=config)
    make_archive(store, "single", FAULTY_HANDLER, work=root / "work1", config="batchSize: 1\n")
    with running_server(root / "run", store, config={"max_response_size": "100000"}) as srv:
        yield srv


def assert_recovered(server: Server) -> None:
    wait_for(lambda: len(worker_pids(server, "faulty")) == 2)
    assert httpx.get(server.inference + "/ping").status_code == 200
    assert post(server, "faulty", "ok").status_code == 200


@pytest.mark.parametrize(("action", "signal_name"), [("kill", "SIGKILL"), ("segv", "SIGSEGV")])
def test_faults_worker_killed_mid_batch_fails_only_that_batch(server: Server, action: str, signal_name: str) -> None:
    before = worker_pids(server, "faulty")
    with ThreadPoolExecutor(8) as pool:
        doomed = pool.submit(post, server, "faulty", action)
        time.sleep(0.1)
        others = [pool.submit(post, server, "faulty", f"slow{i}") for i in range(6)]
        failed = doomed.result()
        served = [f.result() for f in others]
    assert failed.status_code == 500
    assert "faulty" in failed.json()["message"] and signal_name in failed.json()["message"]
    assert [r.status_code for r in served] == [200] * 6
    assert_recovered(server)
    assert worker_pids(server, "faulty") != before


def test_faults_batch_sent_behind_a_crashing_one_is_served_by_the_replacement(server: Server) -> None:
    # One worker, batch 1: while it runs "slow" the next requests wait, and the worker already holds the first of them
    # (the batcher's pipeline). The crash fails its own request only; the ones behind it never ran and are served once.
    with ThreadPoolExecutor(4) as pool:
        first = pool.submit(post, server, "single", "slow")
        time.sleep(0.1)
        doomed = pool.submit(post, server, "single", "kill")
        time.sleep(0.1)
        behind = [pool.submit(post, server, "single", f"after{i}") for i in range(2)]
        assert first.result().status_code == 200
        assert doomed.result().status_code == 500
        answers = [f.result() for f in behind]
    assert [r.status_code for r in answers] == [200, 200]
    assert [r.json()["echo"] for r in answers] == ["after0", "after1"]
    assert len({r.json()["pid"] for r in answers}) == 1  # both on the replacement


def test_faults_hung_worker_is_504_and_replaced(server: Server) -> None:
    before = worker_pids(server, "faulty")
    response = post(server, "faulty", "hang")
    assert response.status_code == 504
    assert "response_timeout=2s" in response.json()["message"]
    assert_recovered(server)
    assert len(set(worker_pids(server, "faulty")) - set(before)) == 1


def test_faults_garbage_frame_is_treated_as_a_crash(server: Server) -> None:
    response = post(server, "faulty", "garbage")
    assert response.status_code == 500
    assert "not JSON" in response.json()["message"]
    assert_recovered(server)


def test_faults_response_over_max_response_size_is_a_clear_error(server: Server) -> None:
    before = worker_pids(server, "faulty")
    response = post(server, "faulty", "huge")
    assert response.status_code == 500
    assert "max_response_size=100000" in response.json()["message"]
    assert worker_pids(server, "faulty") == before  # the worker was not harmed
    assert post(server, "faulty", "ok").status_code == 200


def test_faults_crash_looping_model_answers_503_fast_and_ping_turns_unhealthy(tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    make_archive(store, "crashy", CRASH_HANDLER, work=tmp_path / "work")
    with running_server(tmp_path / "run", store) as server:
        codes = []
        for _ in range(10):
            response = post(server, "crashy", "x")
            codes.append(response.status_code)
            if response.status_code == 503:
                break
        assert codes[:3] == [500, 500, 500], codes
        assert codes[-1] == 503, codes
        assert "failed 3 times in a row" in response.json()["message"]
        assert response.headers["retry-after"]
        assert httpx.get(server.inference + "/ping").status_code == 500


def test_faults_sigterm_under_load_answers_every_accepted_request(tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    make_archive(store, "faulty", FAULTY_HANDLER, work=tmp_path / "work", config="batchSize: 1\n")
    with running_server(tmp_path / "run", store) as server:
        with ThreadPoolExecutor(20) as pool:
            futures = [pool.submit(post, server, "faulty", f"slow{i}") for i in range(20)]
            time.sleep(2)  # all 20 accepted; about 8 s of work queued behind one worker
            server.process.send_signal(signal.SIGTERM)
            time.sleep(0.2)
            with pytest.raises(httpx.ConnectError):
                httpx.get(server.inference + "/ping")
            responses = [f.result() for f in futures]
        assert [r.status_code for r in responses] == [200] * 20
        assert server.process.wait(30) == 0


def test_faults_workers_exit_when_the_front_end_is_killed(tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    make_archive(store, "faulty", FAULTY_HANDLER, work=tmp_path / "work", config="minWorkers: 2\n")
    with running_server(tmp_path / "run", store) as server:
        workers = children_of(server.process.pid)
        assert len(workers) == 2
        errors: list[Exception] = []

        def hang() -> None:
            try:
                post(server, "faulty", "hang", timeout=5)
            except httpx.HTTPError as exc:  # the front end dies under this request
                errors.append(exc)

        busy = threading.Thread(target=hang)
        busy.start()
        time.sleep(0.3)  # one worker is mid-batch, one is idle
        server.process.kill()
        server.process.wait()
        busy.join()
        assert len(errors) == 1
        wait_for(lambda: not any(Path(f"/proc/{pid}").exists() for pid in workers), timeout=10)
    assert all(not _alive(pid) for pid in workers)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
