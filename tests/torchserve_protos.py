"""TorchServe 0.12's own gRPC definitions, for clients that prove servekit's gRPC APIs wire-compatible with TorchServe.

The ``.proto`` files come from the torchserve wheel (``ts/frontend/model-server.jar`` holds them), which ``pip
download`` fetches once into ``~/.cache/servekit-tests/`` (``$XDG_CACHE_HOME`` if set); only the protos are kept.
``client_modules`` compiles them with grpcio-tools (the test extra) into a folder and imports the modules.

Importing them registers TorchServe's message names (``org.pytorch.serve.grpc.*``) in protobuf's default pool, which
servekit's generated modules use too: a test process must never import ``servekit.grpc`` (only the server does).
"""

from __future__ import annotations

import importlib
import io
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from types import ModuleType

import pytest

VERSION = "0.12.0"
JAR = "ts/frontend/model-server.jar"
MEMBERS = ("proto/inference.proto", "proto/management.proto", "proto/open_inference_grpc.proto")
IMPORTS = ("google/rpc/status.proto", "google/rpc/error_details.proto")  # what they import, also in the jar


def cache_dir() -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "servekit-tests" / f"torchserve-{VERSION}-protos"


def torchserve_protos() -> Path:
    """A folder holding TorchServe's ``proto/*.proto`` and the ``google/rpc`` files they import; downloaded once."""
    folder = cache_dir()
    if all((folder / name).is_file() for name in (*MEMBERS, *IMPORTS)):
        return folder
    download = folder.parent / f"wheel-{os.getpid()}"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-deps",
            f"torchserve=={VERSION}",
            "-d",
            str(download),
        ],
        capture_output=True,
        text=True,
    )
    wheels = sorted(download.glob("torchserve-*.whl"))
    if done.returncode != 0 or not wheels:
        pytest.fail(f"cannot download torchserve=={VERSION} for its .proto files:\n{done.stderr}", pytrace=False)
    with zipfile.ZipFile(wheels[0]) as wheel, zipfile.ZipFile(io.BytesIO(wheel.read(JAR))) as jar:
        for name in (*MEMBERS, *IMPORTS):
            target = folder / name
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_suffix(f".{os.getpid()}")
            partial.write_bytes(jar.read(name))
            partial.replace(target)  # atomic: another process may be reading the cache
    for path in download.iterdir():
        path.unlink()
    download.rmdir()
    return folder


def protoc(*args: str) -> None:
    """grpcio-tools' ``protoc`` with ``args``; fails the test with its errors."""
    done = subprocess.run([sys.executable, "-m", "grpc_tools.protoc", *args], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def compile_protos(protos: Path, names: tuple[str, ...], *outputs: str) -> None:
    """``protoc`` on TorchServe's ``proto/<name>.proto`` files, with TorchServe's include paths."""
    protoc(f"-I{protos / 'proto'}", f"-I{protos}", *outputs, *(str(protos / "proto" / f"{n}.proto") for n in names))


def client_modules(out: Path) -> dict[str, ModuleType]:
    """``inference_pb2``, ``inference_pb2_grpc``, ``management_pb2``, ``management_pb2_grpc``, generated into
    ``out`` from TorchServe's files and imported (once per process: the message names can be registered once)."""
    names = ("inference_pb2", "inference_pb2_grpc", "management_pb2", "management_pb2_grpc")
    if all(name in sys.modules for name in names):
        return {name: sys.modules[name] for name in names}
    out.mkdir(parents=True, exist_ok=True)
    compile_protos(torchserve_protos(), ("inference", "management"), f"--python_out={out}", f"--grpc_python_out={out}")
    sys.path.insert(0, str(out))
    return {name: importlib.import_module(name) for name in names}
