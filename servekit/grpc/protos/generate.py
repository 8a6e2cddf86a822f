"""Generate ``servekit/grpc/generated/`` from the ``.proto`` files beside this script, with grpcio-tools (the version
the test extra pins, so that the generated code needs no newer protobuf than ``pyproject.toml`` asks for):
messages (``*_pb2.py`` and their ``*_pb2.pyi`` types) and client stubs (``*_pb2_grpc.py``). servekit's server
builds its handlers from the messages' descriptors (``servekit.grpc.service``); the stubs are for Python clients.

    python servekit/grpc/protos/generate.py          # rewrite servekit/grpc/generated/ (`make protos`)
    python servekit/grpc/protos/generate.py OUT_DIR  # write the modules under OUT_DIR/servekit/grpc/generated/

Each proto is compiled as ``servekit/grpc/generated/<name>.proto``, so that the modules import each other as
``servekit.grpc.generated.*``. ``google/rpc/status.proto`` comes from googleapis-common-protos, a runtime dependency.
"""

from __future__ import annotations

import subprocess
import sys
from importlib import metadata
from pathlib import Path

PROTOS = Path(__file__).resolve().parent
ROOT = PROTOS.parent.parent.parent  # the repository (or site-packages) that holds the servekit package
PACKAGE = "servekit/grpc/generated"
NAMES = ("inference", "management", "open_inference", "open_inference_torchserve")


def header(name: str) -> str:
    return (
        f"# Generated from servekit/grpc/protos/{name}.proto by servekit/grpc/protos/generate.py (`make protos`) with\n"
        f"# grpcio-tools {metadata.version('grpcio-tools')}. Do not edit: change the .proto file and regenerate.\n"
    )


def generate(out: Path) -> list[Path]:
    """Compile the protos into ``out``/servekit/grpc/generated/; returns the files written."""
    import google.rpc  # googleapis-common-protos: its folder holds google/rpc/status.proto

    googleapis = Path(next(iter(google.rpc.__path__))).parent.parent
    target = out / PACKAGE
    target.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "grpc_tools.protoc", f"-I{PACKAGE}={PROTOS}", f"-I{googleapis}"]
    command += [f"--python_out={out}", f"--pyi_out={out}", f"--grpc_python_out={out}"]
    subprocess.run([*command, *(str(PROTOS / f"{name}.proto") for name in NAMES)], check=True)
    written = []
    for name in NAMES:
        for path in sorted(target.glob(f"{name}_pb2*")):
            path.write_text(header(name) + path.read_text())
            written.append(path)
    return written


def main(argv: list[str]) -> int:
    if len(argv) > 1 or (argv and argv[0].startswith("-")):
        print(__doc__, file=sys.stderr)
        return 2
    for path in generate(Path(argv[0]) if argv else ROOT):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
