"""What a deployment's limits do to servekit: a container's CPU quota sizes the torch threads, an explicit
``OMP_NUM_THREADS`` wins, and shutdown is bounded by ``drain_timeout`` even when a worker is stuck in a batch."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from servekit.model_settings import available_cpus, torch_threads
from servekit.server import WORKER_EXIT_S
from tests.helpers import make_archive, running_server

STUCK_HANDLER = """
import time


def handle(data, context):
    if data is None:
        return None
    time.sleep(600)  # a batch that will not finish before the server stops
    return ["late" for _ in data]
"""


def test_available_cpus_is_capped_by_a_cgroup_cpu_quota(tmp_path: Path) -> None:
    affinity = len(os.sched_getaffinity(0))
    quota = tmp_path / "cpu.max"
    quota.write_text("150000 100000\n")  # 1.5 CPUs: 2 threads' worth, rounded up
    assert available_cpus(quota) == min(affinity, 2)
    quota.write_text("max 100000\n")
    assert available_cpus(quota) == affinity
    assert available_cpus(tmp_path / "absent") == affinity


def test_explicit_omp_num_threads_is_used_as_it_is(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert torch_threads(workers=4) == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "not a number")
    assert torch_threads(workers=1) == max(1, available_cpus() - 1)


def test_shutdown_is_bounded_by_the_drain_timeout_with_a_stuck_worker(tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    make_archive(store, "stuck", STUCK_HANDLER, work=tmp_path, config="responseTimeout: 900\n")
    drain = 2
    with running_server(tmp_path / "run", store, ["stuck=stuck.mar"], config={"drain_timeout": str(drain)}) as server:
        statuses: list[int] = []

        def call() -> None:
            try:
                statuses.append(server.post("/predictions/stuck", content=b"x", timeout=60).status_code)
            except httpx.HTTPError:
                statuses.append(0)

        client = threading.Thread(target=call)
        client.start()
        time.sleep(1.0)  # the request is in the worker's hands
        start = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        code = server.process.wait(60)
        elapsed = time.monotonic() - start
        client.join(60)
    assert code == 0, server.log_text()[-2000:]
    # not a speed check: without the bound, shutdown waits out the stuck batch (600 s) or response_timeout (900 s);
    # the bound is drain + WORKER_EXIT_S + 2 s to reap, and a wide margin keeps a loaded machine from mattering
    assert elapsed < drain + WORKER_EXIT_S + 2 + 30, elapsed
    assert statuses and statuses[0] != 200  # the stuck request was not answered as if it had succeeded
