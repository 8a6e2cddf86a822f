"""``servekit start | stop | archive``: TorchServe's ``torchserve --start/--stop`` and ``torch-model-archiver``.

``start`` without ``--foreground`` launches the server in the background, returns once ``/ping``
answers ``Healthy`` (exit 0) or the server fails (exit 1, with the end of its log), and writes the
server's output to ``logs/servekit.log`` (``LOG_LOCATION`` if set).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from servekit import archiver, server, tls
from servekit.api.keys import supplied_keys
from servekit.config import load_settings
from servekit.errors import ServekitError
from servekit.settings import Settings


def _add_start_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-store", help="folder holding model archives")
    parser.add_argument("--models", nargs="+", default=[], help="NAME=ARCHIVE[,...] or 'all'")
    parser.add_argument("--ts-config", help="a TorchServe config.properties")
    parser.add_argument("--foreground", action="store_true", help="run in this process")
    parser.add_argument("--ncs", "--no-config-snapshots", action="store_true", dest="ncs", help="no snapshots")
    parser.add_argument("--disable-token-auth", "--dt", action="store_true", dest="disable_token_auth")
    parser.add_argument("--enable-model-api", action="store_true")
    parser.add_argument("--log-config", help="accepted for TorchServe compatibility; ignored")
    parser.add_argument("--workflow-store", help="accepted for TorchServe compatibility; ignored")
    parser.add_argument("--plugins-path", "--ppath", help="accepted for TorchServe compatibility; ignored")
    parser.add_argument("--startup-wait", type=float, default=300, help="seconds start waits for /ping")


def settings_from_args(args: argparse.Namespace) -> Settings:
    flags: dict[str, str] = {}
    if args.model_store:
        if not Path(args.model_store).is_dir():
            raise ServekitError(f"--model-store {args.model_store} is not a folder")
        flags["model_store"] = args.model_store
    if args.models:
        flags["load_models"] = ",".join(args.models)
    if args.ncs:
        flags["snapshots"] = "false"
    if args.disable_token_auth:
        flags["disable_token_authorization"] = "true"
    if args.enable_model_api:
        flags["enable_model_api"] = "true"
    return load_settings(args.ts_config, flags)


def _running_pid() -> int | None:
    try:
        pid = int(json.loads(server.pid_file().read_text())["pid"])
        os.kill(pid, 0)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return pid


def _ping(settings: Settings) -> bool:
    address = settings.inference_address
    context = None
    if address.scheme == "https":  # our own child on its own address: its certificate need not name that host
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    try:
        with urllib.request.urlopen(f"{address}/ping", timeout=2, context=context) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _logged_start(log_path: Path, offset: int) -> bool:
    """Whether the server's log, from ``offset`` on, says its startup models are loaded: how a start with client
    certificates required (``client_ca_file``) knows it, since ``/ping`` needs a certificate there."""
    with open(log_path, "rb") as log:
        log.seek(offset)
        return b"Model server started." in log.read()


def start(args: argparse.Namespace, argv: list[str]) -> int:
    settings = settings_from_args(args)
    if args.foreground:
        return server.run(settings)
    if _running_pid() is not None:
        print("servekit is already running, please use servekit stop to stop it.")
        return 1
    tls.server_context(settings)  # a bad key or certificate stops the start here, not in the background server's log
    supplied_keys(settings)  # and so do bad supplied token keys
    mutual_tls = settings.inference_address.scheme == "https" and settings.client_ca_file is not None
    log_path = settings.log_location / "servekit.log"
    try:
        settings.log_location.mkdir(parents=True, exist_ok=True)
        log = open(log_path, "ab")  # noqa: SIM115 (closed by the with block below)
    except OSError as exc:
        raise ServekitError(
            f"cannot write the server's log {log_path.absolute()} ({exc.strerror or exc}): set LOG_LOCATION to a "
            "writable folder, or start with --foreground (it logs to stderr)"
        ) from None
    with log:
        offset = log.tell()
        child = subprocess.Popen(
            [sys.executable, "-m", "servekit", *argv, "--foreground"],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + args.startup_wait
    while time.monotonic() < deadline:
        if child.poll() is not None:
            tail = log_path.read_text(errors="replace").splitlines()[-20:]
            print(f"servekit failed to start (exit code {child.returncode}); {log_path}:", *tail, sep="\n")
            return 1
        if _ping(settings) or (mutual_tls and _logged_start(log_path, offset)):
            print(f"servekit started (pid {child.pid}); log: {log_path}")
            return 0
        time.sleep(0.2)
    print(
        f"servekit did not become healthy within {args.startup_wait:g}s; it keeps running (pid {child.pid}), "
        f"see {log_path}"
    )
    return 1


def stop(timeout: float = 60.0) -> int:
    pid = _running_pid()
    if pid is None:
        print("servekit is not currently running.")
        return 0
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            print("servekit has stopped.")
            return 0
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    print(f"servekit did not stop within {timeout:g}s and was killed.")
    return 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="servekit", description="A PyTorch model server, drop-in for TorchServe.")
    commands = parser.add_subparsers(dest="command", required=True)
    _add_start_arguments(commands.add_parser("start", help="start the server"))
    commands.add_parser("stop", help="stop the server started from this temp dir")
    archiver.add_arguments(commands.add_parser("archive", help="write a model archive (torch-model-archiver's flags)"))
    args = parser.parse_args(argv)
    try:
        if args.command == "start":
            return start(args, argv)
        if args.command == "stop":
            return stop()
        print(archiver.run(args))
        return 0
    except ServekitError as exc:
        print(f"servekit: {exc.message}", file=sys.stderr)
        return 1
