"""``servekit start`` / ``servekit stop`` as scripts use them: background start that returns once healthy, stop that
ends the server and its workers."""

from __future__ import annotations

import ctypes
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.helpers import TS_HANDLER_PY, free_port, make_archive, write_config

SERVEKIT = str(Path(sys.executable).with_name("servekit"))


def run_cli(args: list[str], workdir: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TMPDIR": str(workdir)}
    return subprocess.run([SERVEKIT, *args], cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def wait_gone(pids: list[int], timeout: float = 10) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.1)
    return [p for p in pids if alive(p)]


@pytest.fixture
def store(tmp_path: Path) -> Path:
    store = tmp_path / "store"
    store.mkdir()
    make_archive(store, "mlp", TS_HANDLER_PY, work=tmp_path / "work", model="eager")
    return store


def test_cli_start_returns_when_healthy_and_stop_ends_server_and_workers(tmp_path: Path, store: Path) -> None:
    ports = [free_port() for _ in range(3)]
    cfg = write_config(tmp_path / "config.properties", ports)
    args = ["start", "--model-store", str(store), "--models", "mlp=mlp.mar", "--ts-config", str(cfg)]
    args += ["--ncs", "--disable-token-auth", "--enable-model-api"]  # flags TorchServe scripts pass
    started = run_cli(args, tmp_path)
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        # start returned only once the server answers /ping as healthy
        ping = httpx.get(f"http://127.0.0.1:{ports[0]}/ping")
        assert ping.json() == {"status": "Healthy"}
        reply = httpx.post(f"http://127.0.0.1:{ports[0]}/predictions/mlp", json={"data": [0.0] * 16})
        assert reply.status_code == 200 and len(reply.json()) == 4
        workers = httpx.get(f"http://127.0.0.1:{ports[1]}/models/mlp").json()[0]["workers"]
        pids = [w["pid"] for w in workers]
        server_pid = int(__import__("json").loads((tmp_path / ".servekit.pid").read_text())["pid"])
        again = run_cli(args, tmp_path)
        assert again.returncode == 1 and "already running" in again.stdout
    finally:
        stopped = run_cli(["stop"], tmp_path)
    assert stopped.returncode == 0 and "stopped" in stopped.stdout
    assert wait_gone([server_pid, *pids]) == []
    assert not (tmp_path / ".servekit.pid").exists()
    assert "Model server started." in (tmp_path / "logs" / "servekit.log").read_text()


def test_cli_stop_without_server_says_so(tmp_path: Path) -> None:
    result = run_cli(["stop"], tmp_path)
    assert result.returncode == 0
    assert "not currently running" in result.stdout


def test_cli_start_fails_fast_when_port_is_taken(tmp_path: Path, store: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        ports = [busy.getsockname()[1], free_port(), free_port()]
        cfg = write_config(tmp_path / "config.properties", ports)
        result = run_cli(["start", "--model-store", str(store), "--models", "all", "--ts-config", str(cfg)], tmp_path)
    assert result.returncode == 1
    assert "failed to start (exit code 1)" in result.stdout
    assert "address already in use" in result.stdout and "could not bind the server ports" in result.stdout
    assert not (tmp_path / "key_file.json").exists()  # token auth was on: its key file is cleaned up


def test_cli_start_rejects_bad_config_with_message(tmp_path: Path, store: Path) -> None:
    cfg = tmp_path / "bad.properties"
    cfg.write_text("job_queue_size=lots\n")
    result = run_cli(["start", "--model-store", str(store), "--ts-config", str(cfg)], tmp_path)
    assert result.returncode == 1
    assert "job_queue_size" in result.stderr


def without_dac_override() -> None:
    """Run in the child before exec: as root, give up the capabilities that let root write where a folder's mode says
    no one may (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH), so that a folder of mode 0555 is read-only to the server as it
    is to uid 10001 in the image. Dropped from the bounding set, they are not in root's permitted set after exec."""
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (1, 2):
        if libc.prctl(24, capability, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def run_read_only(home: Path, command: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``command`` run in ``home`` made read-only for the while (mode 0555; as root, without the capabilities that
    ignore modes), its output captured."""
    home.chmod(0o555)
    try:
        return subprocess.run(
            command,
            cwd=home,
            env=env,
            preexec_fn=without_dac_override if os.geteuid() == 0 else None,
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        home.chmod(0o755)


def test_cli_start_in_a_read_only_working_directory_fails_with_one_line_naming_the_key_file(tmp_path: Path) -> None:
    """The image's working directory under a read-only root file system (docs/deploy.md): token authorization writes
    key_file.json there. A folder of mode 0555 stands for it (as root, without the capabilities that ignore modes)."""
    home = tmp_path / "home"
    home.mkdir()
    (tmp_path / "tmp").mkdir()
    cfg = write_config(tmp_path / "config.properties", [free_port() for _ in range(3)])
    command = [SERVEKIT, "start", "--foreground", "--ncs", "--ts-config", str(cfg)]
    result = run_read_only(home, command, {**os.environ, "TMPDIR": str(tmp_path / "tmp")})
    assert result.returncode == 1, result.stderr
    assert result.stderr.splitlines() == [
        f"servekit: cannot write the token keys to {home / 'key_file.json'} (Permission denied): start servekit in a "
        "writable working directory, supply the keys (key_file, or SERVEKIT_INFERENCE_KEY and "
        "SERVEKIT_MANAGEMENT_KEY), or turn token authorization off (--disable-token-auth)"
    ]
    assert not list(home.iterdir())


@pytest.mark.parametrize(
    ("foreground", "message"),
    [
        (
            True,
            "cannot write snapshots in {logs}/config (Not a directory): set LOG_LOCATION to a writable folder, "
            "or turn snapshots off (--ncs, or snapshots=false)",
        ),
        (
            False,
            "cannot write the server's log {logs}/servekit.log (Not a directory): set LOG_LOCATION to a writable "
            "folder, or start with --foreground (it logs to stderr)",
        ),
    ],
)
def test_cli_start_with_log_location_not_writable_fails_with_one_line_naming_it(
    tmp_path: Path, foreground: bool, message: str
) -> None:
    """LOG_LOCATION (snapshots; a background start's log) under a regular file: a path that no one, root included, can
    write."""
    (tmp_path / "file").write_text("")
    logs = tmp_path / "file" / "logs"
    cfg = write_config(tmp_path / "config.properties", [free_port() for _ in range(3)])
    args = ["start", "--ts-config", str(cfg), *(["--foreground"] if foreground else [])]
    env = {**os.environ, "TMPDIR": str(tmp_path), "LOG_LOCATION": str(logs)}
    result = subprocess.run([SERVEKIT, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1, result.stderr
    assert result.stderr.splitlines() == ["servekit: " + message.format(logs=logs)]
    assert not (tmp_path / "key_file.json").exists(), "the start stopped before token authorization wrote its keys"
