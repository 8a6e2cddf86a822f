"""Shared test helpers: real torch models archived in tmp dirs, and real servers on free ports."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import ssl
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import torch

from servekit import archiver

MLP_PY = """
import torch
from torch import nn


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))

    def forward(self, x):
        return self.net(x)
"""

# The example handler of model_store/: a file written for TorchServe (imports from `ts.`), {"data": [...]} in.
TS_HANDLER_PY = (Path(__file__).parent.parent / "model_store" / "mlp" / "handler.py").read_text()


def build_mlp(seed: int = 0) -> torch.nn.Module:
    namespace: dict[str, object] = {}
    exec(MLP_PY, namespace)  # the same source that goes into the archive
    torch.manual_seed(seed)
    model = namespace["MLP"]()  # type: ignore[operator]
    assert isinstance(model, torch.nn.Module)
    return model.eval()


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def make_archive(
    store: Path,
    name: str,
    handler_src: str,
    *,
    work: Path,
    model: str | None = None,
    config: str | None = None,
    fmt: str = "default",
    version: str = "1.0",
    extra: Sequence[str] = (),
) -> Path:
    """Archive a model with ``servekit archive`` into ``store``. ``model`` is None (handler only),
    "eager" (model.py + state dict) or "torchscript"."""
    src = work / f"src-{name}-{version}"
    src.mkdir(parents=True, exist_ok=True)
    args = ["--model-name", name, "--version", version, "--export-path", str(store), "--archive-format", fmt]
    args += ["--handler", str(write(src / f"{name}_handler.py", handler_src))]
    if model is not None:
        net = build_mlp()
        if model == "eager":
            args += ["--model-file", str(write(src / "model.py", MLP_PY))]
            torch.save(net.state_dict(), src / "weights.pt")
        else:
            torch.jit.trace(net, torch.zeros(1, 16)).save(str(src / "weights.pt"))  # type: ignore[no-untyped-call]
        args += ["--serialized-file", str(src / "weights.pt")]
    if config is not None:
        args += ["--config-file", str(write(src / "model-config.yaml", config))]
    if extra:
        args += ["--extra-files", ",".join(extra)]
    assert archiver.main(args) == 0
    return next(p for p in store.iterdir() if p.name.startswith(name))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    inference: str
    management: str
    metrics: str
    log: Path
    workdir: Path

    def post(self, path: str, **kwargs: object) -> httpx.Response:
        kwargs.setdefault("timeout", 60)
        return httpx.post(self.inference + path, **kwargs)  # type: ignore[arg-type]

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def write_config(path: Path, ports: Sequence[int], extra: dict[str, str] | None = None, scheme: str = "http") -> Path:
    lines = [
        f"inference_address={scheme}://127.0.0.1:{ports[0]}",
        f"management_address={scheme}://127.0.0.1:{ports[1]}",
        f"metrics_address={scheme}://127.0.0.1:{ports[2]}",
        "enable_grpc=false",  # else every test server binds 7070/7071; tests/test_grpc.py turns it on, on free ports
    ]
    lines += [f"{k}={v}" for k, v in (extra or {}).items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def wait_healthy(
    url: str, process: subprocess.Popen[bytes], log: Path, timeout: float = 90, verify: ssl.SSLContext | bool = True
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{log.read_text(errors='replace')}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url + "/ping", timeout=2, verify=verify).status_code == 200:
                return
        time.sleep(0.1)
    raise RuntimeError(f"server not healthy after {timeout}s:\n{log.read_text(errors='replace')}")


@contextlib.contextmanager
def running_server(
    workdir: Path,
    store: Path,
    models: Sequence[str] = ("all",),
    config: dict[str, str] | None = None,
    args: Sequence[str] = ("--disable-token-auth", "--ncs"),
    wait: bool = True,
    scheme: str = "http",
    verify: ssl.SSLContext | bool = True,
) -> Iterator[Server]:
    """``servekit start --foreground`` in a subprocess on free ports; stopped (TERM, then KILL) afterwards.
    By default without token auth and snapshots: tests of those pass their own ``args``. ``scheme="https"`` serves
    the three ports over TLS (``config`` names the key and certificate); ``/ping`` is then called with ``verify``."""
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / "server.log"
    env = {**os.environ, "TMPDIR": str(workdir), "PYTHONUNBUFFERED": "1"}
    for attempt in range(3):
        # A free port can be taken (by a client's ephemeral port) before the server binds it: then try others.
        ports = [free_port() for _ in range(3)]
        cfg = write_config(workdir / "config.properties", ports, config, scheme)
        command = [sys.executable, "-m", "servekit", "start", "--foreground", "--model-store", str(store)]
        command += ["--ts-config", str(cfg), "--models", *models, *args]
        with open(log, "wb") as out:
            process = subprocess.Popen(command, cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT)
        inference, management, metrics = (f"{scheme}://127.0.0.1:{p}" for p in ports)
        server = Server(process, inference, management, metrics, log, workdir)
        try:
            if wait:
                wait_healthy(server.inference, process, log, verify=verify)
        except RuntimeError:
            stop_process(process)
            if attempt < 2 and "address already in use" in log.read_text(errors="replace"):
                continue
            raise
        break
    try:
        yield server
    finally:
        stop_process(process)


@contextlib.contextmanager
def serving_one(root: Path, name: str, handler_src: str, config: str | None = None) -> Iterator[Server]:
    """A server (default arguments) on a fresh store holding one archived model, ``name``, with no weights."""
    store = root / "store"
    store.mkdir()
    make_archive(store, name, handler_src, work=root / "work", config=config)
    with running_server(root / "run", store) as server:
        yield server


def stop_process(process: subprocess.Popen[bytes], timeout: float = 30) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def children_of(pid: int, zygote: bool = False) -> list[int]:
    """PIDs whose parent is ``pid`` (from /proc): a server's workers. The worker zygote (``servekit.zygote``, which
    workers are forked from) is left out unless ``zygote``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                stat = (entry / "stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) == pid and (
                    zygote or b"\0servekit.zygote\0" not in (entry / "cmdline").read_bytes()
                ):
                    found.append(int(entry.name))
    return found


def zygote_of(pid: int) -> int | None:
    """The pid of the worker zygote of the server ``pid``, if it has one."""
    workers = set(children_of(pid))
    return next((child for child in children_of(pid, zygote=True) if child not in workers), None)


def pending(server: Server, model: str) -> int:
    """The requests of ``model`` waiting for their turn (its describe's ``jobQueueStatus.pendingRequests``)."""
    described = httpx.get(f"{server.management}/models/{model}", timeout=10).json()
    return int(described[0]["jobQueueStatus"]["pendingRequests"])


def reached(gate: Path) -> None:
    """Wait until a batch waits at ``gate`` (the worker is busy with it)."""
    deadline = time.monotonic() + 20
    while not Path(f"{gate}.reached").exists():
        assert time.monotonic() < deadline, "no batch reached the gate"
        time.sleep(0.01)


def wait_pending(server: Server, model: str, n: int) -> None:
    deadline = time.monotonic() + 20
    while pending(server, model) != n:
        assert time.monotonic() < deadline, f"{model}: {pending(server, model)} requests waiting, not {n}"
        time.sleep(0.02)
