"""Workers forked from the zygote (servekit.zygote, servekit.forkserver), on real servers: a forked worker starts as a
spawned one would (environment, working directory, paths, arguments, threads) and is the front end's child; module
state does not leak between workers; a crashed forked worker is replaced; a killed zygote leaves the workers serving,
workers are spawned meanwhile and it is started again; the zygote dies with the front end."""

from __future__ import annotations

import importlib.util
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from tests.helpers import Server, children_of, make_archive, running_server, zygote_of

# Answers facts about the process it runs in; "mark" first sets a module global of a module the zygote imported.
PROBE_HANDLER = """
import ctypes
import json
import os
import signal
import sys

import torch


def blas_threads():
    # the threads of numpy's OpenBLAS, which torch's import loaded
    for line in open("/proc/self/maps"):
        path = line.split(maxsplit=5)[-1].strip()
        if "openblas" in path.rsplit("/", 1)[-1]:
            library = ctypes.CDLL(path)
            for prefix in ("openblas", "scipy_openblas"):
                for suffix in ("", "64_", "_64_"):
                    getter = getattr(library, f"{prefix}_get_num_threads{suffix}", None)
                    if getter is not None:
                        return getter()
    return None


def handle(data, context):
    if data is None:
        return None
    answers = []
    for row in data:
        if row["body"] == "mark":
            torch.servekit_test_mark = context.model_name
        answers.append(json.dumps({
            "pid": os.getpid(),
            "ppid": os.getppid(),
            "main": sys.modules["__main__"].__spec__.name,
            "argv0": os.path.basename(sys.argv[0]),
            "args": sys.argv[1:],
            "cwd": os.getcwd(),
            "path0": sys.path[0],
            "model_dir": context.system_properties["model_dir"],
            "omp": os.environ.get("OMP_NUM_THREADS"),
            "openblas": os.environ.get("OPENBLAS_NUM_THREADS"),
            "threads": torch.get_num_threads(),
            "blas": blas_threads(),
            "sigint": signal.getsignal(signal.SIGINT) is signal.default_int_handler,
            "mark": getattr(torch, "servekit_test_mark", None),
            "cuda": torch.cuda.is_initialized(),
        }))
    return answers
"""


def probe(server: Server, model: str, body: str = "facts") -> dict[str, Any]:
    response = server.post(f"/predictions/{model}", content=body.encode(), headers={"content-type": "text/plain"})
    assert response.status_code == 200, response.text
    facts: dict[str, Any] = response.json()
    return facts


def probe_each(server: Server, model: str, n: int) -> dict[int, dict[str, Any]]:
    """The facts of each of the ``n`` workers of ``model`` (batch size 1: idle workers take turns), by pid."""
    answers: dict[int, dict[str, Any]] = {}
    deadline = time.monotonic() + 20
    while len(answers) < n:
        assert time.monotonic() < deadline, answers
        facts = probe(server, model)
        answers[facts["pid"]] = facts
    return answers


def scale(server: Server, model: str, n: int) -> httpx.Response:
    return httpx.put(f"{server.management}/models/{model}?min_worker={n}&synchronous=true", timeout=60)


def worker_pids(server: Server, model: str) -> set[int]:
    workers = httpx.get(f"{server.management}/models/{model}", timeout=10).json()[0]["workers"]
    return {int(w["pid"]) for w in workers if w["status"] == "READY"}


def cmdline(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().rstrip("\0").split("\0")


def eventually(check: Callable[[], object], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.05)


def build_store(root: Path) -> Path:
    store = root / "store"
    store.mkdir()
    for name in ("probe", "other"):
        make_archive(store, name, PROBE_HANDLER, work=root / f"work-{name}", config="batchSize: 1\n")
    return store


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("zygote")
    with running_server(root / "run", build_store(root)) as srv:
        yield srv


def test_zygote_forked_worker_starts_as_a_spawned_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the workers' thread count (the zygote imports torch at one thread)
    store = build_store(tmp_path)
    with running_server(tmp_path / "fork", store) as server:
        forked = probe(server, "probe")
        assert forked["main"] == "servekit.zygote"  # it was forked, not spawned
        zygote = zygote_of(server.process.pid)
        assert zygote is not None and cmdline(zygote)[1:3] == ["-m", "servekit.zygote"]
        assert set(children_of(server.process.pid)) == {forked["pid"]} | worker_pids(server, "other")
        command = cmdline(forked["pid"])
    with running_server(tmp_path / "spawn", store, config={"fork_workers": "false"}) as spawning:
        spawned = probe(spawning, "probe")
        assert spawned["main"] == "servekit.worker"
        assert zygote_of(spawning.process.pid) is None
        assert cmdline(spawned["pid"])[0] == command[0]
    assert command[1:] == ["-m", "servekit.worker", *forked["args"]]  # as ps and pgrep show it
    for facts, srv in ((forked, server), (spawned, spawning)):
        assert facts["ppid"] == srv.process.pid  # the front end's child, reaped by it; its death signal names it
        assert facts["args"][0] == "--fd" and facts["args"][2:] == ["--parent", str(srv.process.pid)]
        assert facts["cwd"] == facts["path0"] == facts["model_dir"]
    same = ("argv0", "omp", "openblas", "threads", "blas", "sigint", "mark", "cuda")
    assert {k: forked[k] for k in same} == {k: spawned[k] for k in same}
    assert forked["argv0"] == "worker.py" and forked["omp"] == "2" and forked["threads"] == 2
    assert forked["blas"] == (2 if importlib.util.find_spec("numpy") else None)  # numpy's OpenBLAS, if any
    assert forked["sigint"] and not forked["cuda"]


def test_zygote_module_state_does_not_leak_between_workers(server: Server) -> None:
    marked = probe(server, "probe", "mark")
    assert marked["mark"] == "probe"
    assert probe(server, "other")["mark"] is None  # another model's worker
    assert scale(server, "probe", 2).status_code == 200  # forked after the mark: from the zygote, which has none
    try:
        marks = {pid: facts["mark"] for pid, facts in probe_each(server, "probe", 2).items()}
        assert sorted(marks.values(), key=str) == [None, "probe"] and marks[marked["pid"]] == "probe"
    finally:
        assert scale(server, "probe", 1).status_code == 200


def test_zygote_crashed_forked_worker_is_replaced_by_a_forked_one(server: Server) -> None:
    (victim,) = worker_pids(server, "other")
    os.kill(victim, signal.SIGKILL)
    eventually(lambda: worker_pids(server, "other") - {victim})
    replacement = probe(server, "other")
    assert replacement["pid"] != victim and replacement["main"] == "servekit.zygote"
    assert "of other exited: killed by SIGKILL" in server.log_text()  # its exit status reached the front end


def test_zygote_killed_leaves_workers_serving_and_comes_back(tmp_path: Path) -> None:
    with running_server(tmp_path / "run", build_store(tmp_path)) as server:
        before = probe(server, "probe")
        zygote = zygote_of(server.process.pid)
        assert zygote is not None
        os.kill(zygote, signal.SIGKILL)
        eventually(lambda: "worker zygote lost" in server.log_text())
        assert probe(server, "probe")["pid"] == before["pid"]  # its workers are not the zygote's children
        assert scale(server, "other", 2).status_code == 200  # spawned while there is no zygote, or forked
        eventually(lambda: zygote_of(server.process.pid) not in (None, zygote))
        assert scale(server, "probe", 2).status_code == 200
        (added,) = (facts for pid, facts in probe_each(server, "probe", 2).items() if pid != before["pid"])
        assert added["main"] == "servekit.zygote"  # forked from the new zygote
        assert cmdline(added["pid"])[1:3] == ["-m", "servekit.worker"]
        eventually(lambda: server.log_text().count("worker zygote started") == 2)  # INFO lines are flushed in batches


def test_zygote_dies_with_the_front_end(tmp_path: Path) -> None:
    with running_server(tmp_path / "run", build_store(tmp_path)) as server:
        probe(server, "probe")
        processes = children_of(server.process.pid, zygote=True)
        assert len(processes) == 3  # the zygote and two workers
        server.process.kill()
        server.process.wait()
        eventually(lambda: not any(Path(f"/proc/{pid}").exists() for pid in processes), timeout=10)


GPU_HANDLER = """
import torch


def handle(data, context):
    gpu = context.system_properties["gpu_id"]
    if data is None:
        torch.ones(1).to(f"cuda:{gpu}")  # CUDA is initialised here, in the forked worker
        return None
    return [f"{torch.cuda.is_initialized()} {gpu}"] * len(data)
"""


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_zygote_gpu_worker_initialises_cuda_after_the_fork(tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    make_archive(store, "gpu", GPU_HANDLER, work=tmp_path / "work", config="deviceType: gpu\n")
    with running_server(tmp_path / "run", store) as server:
        response = server.post("/predictions/gpu", content=b"x", headers={"content-type": "text/plain"})
        assert response.status_code == 200 and response.text == "True 0", response.text
        zygote = zygote_of(server.process.pid)
        assert zygote is not None
        opened = [os.readlink(fd) for fd in Path(f"/proc/{zygote}/fd").iterdir()]
        assert not any(target.startswith("/dev/nvidia") for target in opened)
