"""TorchServe 0.12 and servekit side by side: the same model store, config.properties keys and flags, each on its own
ports in 28000-28999, each in its own scratch folder (pid file, logs, worker sockets); stopped by PID."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent.parent
# The side venv of benchmarks/setup_peers.sh (`make compat` creates it).
PEERS_VENV = Path(os.environ.get("BENCH_PEERS_VENV", "/tmp/servekit-peers-venv"))
TORCHSERVE = PEERS_VENV / "bin" / "torchserve"
SERVEKIT = ROOT / ".venv" / "bin" / "servekit"
# numpy for TorchServe's kservev2 envelope, installed apart (`make compat`) so that the shared peers venv is unchanged.
NUMPY_DIR = Path(os.environ.get("COMPAT_NUMPY_DIR", "/tmp/servekit-compat-numpy"))
FLAGS = ("--foreground", "--ncs", "--disable-token-auth")
PORTS = range(28000, 29000)
GIVEN: set[int] = set()  # ports given out in this run


@dataclass(frozen=True)
class Endpoint:
    """One running server, as a client sees it."""

    name: str
    inference: str
    management: str
    metrics: str
    log: Path

    def url(self, port: str, path: str) -> str:
        return {"inference": self.inference, "management": self.management, "metrics": self.metrics}[port] + path


@dataclass(frozen=True)
class Pair:
    torchserve: Endpoint
    servekit: Endpoint


def require_peers() -> None:
    """Fail (with the command that installs them) when TorchServe or Java is missing: a differential test that did
    not run must not pass."""
    if not TORCHSERVE.exists() or shutil.which("java") is None:
        pytest.fail(f"TorchServe 0.12 ({TORCHSERVE}) or java missing: run `make compat`", pytrace=False)
    if not SERVEKIT.exists():
        pytest.fail(f"{SERVEKIT} missing: run `make compat`", pytrace=False)


def free_ports(count: int) -> list[int]:
    """Ports free now and not given out before in this run (a server binds its ports only once its models load)."""
    found: list[int] = []
    for port in PORTS:
        if port in GIVEN:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        found.append(port)
        if len(found) == count:
            GIVEN.update(found)
            return found
    raise RuntimeError(f"fewer than {count} free ports in {PORTS}")


def write_properties(path: Path, ports: Sequence[int], keys: Mapping[str, str]) -> Path:
    """The three REST addresses and the two gRPC ports (each server its own: both serve gRPC by default), then
    ``keys``."""
    lines = [
        f"{api}_address=http://127.0.0.1:{port}"
        for api, port in zip(("inference", "management", "metrics"), ports[:3], strict=True)
    ]
    lines += [f"grpc_{api}_port={port}" for api, port in zip(("inference", "management"), ports[3:], strict=True)]
    path.write_text("\n".join([*lines, *(f"{k}={v}" for k, v in keys.items())]) + "\n")
    return path


def start(
    name: str, workdir: Path, store: Path, models: Sequence[str], keys: Mapping[str, str]
) -> tuple[subprocess.Popen[bytes], Endpoint]:
    workdir.mkdir(parents=True)
    ports = free_ports(5)
    config = write_properties(workdir / "config.properties", ports, keys)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    # TMPDIR: the pid file; TEMP: TorchServe's java.io.tmpdir (worker sockets, extracted archives)
    env |= {"TMPDIR": str(workdir), "TEMP": str(workdir), "LOG_LOCATION": str(workdir / "logs")}
    env |= {"METRICS_LOCATION": str(workdir / "logs"), "PYTHONUNBUFFERED": "1"}
    if name == "torchserve":
        command = [str(TORCHSERVE), "--start"]
        if NUMPY_DIR.is_dir():
            env["PYTHONPATH"] = str(NUMPY_DIR)
    else:
        command = [str(SERVEKIT), "start"]
    command += [*FLAGS, "--model-store", str(store), "--ts-config", str(config), "--models", *models]
    log = workdir / "server.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            command, cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    inference, management, metrics = (f"http://127.0.0.1:{p}" for p in ports[:3])
    return process, Endpoint(name, inference, management, metrics, log)


def wait_ready(process: subprocess.Popen[bytes], endpoint: Endpoint, models: Sequence[str], timeout: float) -> None:
    """Until /ping is 200 and every model's workers are READY."""
    deadline = time.monotonic() + timeout
    waiting = ["/ping", *(f"/models/{m.split('=')[0]}" for m in models)]
    while waiting and time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{endpoint.name} exited with {process.returncode}:\n{tail(endpoint.log)}")
        path = waiting[0]
        with contextlib.suppress(httpx.HTTPError, ValueError):
            if path == "/ping":
                if httpx.get(endpoint.inference + path, timeout=5).status_code == 200:
                    waiting.pop(0)
                    continue
            else:
                workers = httpx.get(endpoint.management + path, timeout=5).json()[0]["workers"]
                if workers and all(w["status"] == "READY" for w in workers):
                    waiting.pop(0)
                    continue
        time.sleep(0.3)
    if waiting:
        raise RuntimeError(f"{endpoint.name} not ready after {timeout}s ({waiting[0]}):\n{tail(endpoint.log)}")


def stop(process: subprocess.Popen[bytes], workdir: Path) -> None:
    """TERM to the server's PID (TorchServe's JVM, from its pid file), then KILL to what is left of its group."""
    pid = process.pid
    with contextlib.suppress(OSError, ValueError):
        pid = int((workdir / ".model_server.pid").read_text().split()[0])  # the JVM under TorchServe's launcher
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(30)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)  # its workers; the group is this server's own (start_new_session)
    process.wait()


def tail(log: Path, lines: int = 60) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


@contextlib.contextmanager
def running_pair(root: Path, store: Path, models: Sequence[str], keys: Mapping[str, str]) -> Iterator[Pair]:
    """TorchServe and servekit, both serving ``models`` of ``store`` with the same config.properties ``keys``."""
    require_peers()
    started: list[tuple[subprocess.Popen[bytes], Path]] = []
    try:
        endpoints = {}
        for name in ("torchserve", "servekit"):
            process, endpoints[name] = start(name, root / name, store, models, keys)
            started.append((process, root / name))
        for (process, _), endpoint in zip(started, endpoints.values(), strict=True):
            wait_ready(process, endpoint, models, timeout=300)
        yield Pair(endpoints["torchserve"], endpoints["servekit"])
    finally:
        for process, workdir in started:
            stop(process, workdir)
