"""W2 eager vs compiled (the model config's ``pt2``) on the CPU (issue 17), in process and through servekit.

    python benchmarks/pt2.py [--backend inductor] [--mode M] [--options JSON] [--rounds 3] [--no-server]

**In process.** The W2 MLP of ../shared/bench/models.py (512 -> 2048 -> 2048 -> 512 -> 10, its weights), eager and
compiled the way ``BaseHandler`` compiles it (``servekit.pt2.prepare``: ``torch.compile`` with --backend, --mode and
--options, then the warm-up on ``inputs`` ``[-1, 512]``), with --threads torch threads (1: what a worker gets with the
harness's settings). Per round, the two alternate; per batch size (--batches) the median time of one forward under
``torch.inference_mode()`` over --seconds. Printed: the compile and warm-up time, then per batch size the medians over
the rounds of the per-batch latency and the samples/s, and compiled/eager.

**Through servekit.** Two archives of W2 (its state dict, a ``BaseHandler`` that reads ``{"data": [512 floats]}``),
the second with ``pt2: {compile: {enable: true, backend: B}}`` and ``inputs``, started as ``ab.py`` starts servekit
(1 worker, 1 torch thread, batch 8, max delay 5 ms, no token auth), alternating each round; the answers of both are
compared with the eager model's first; wrk (``post.lua`` of the harness) at --clients. Printed: seconds from start to
ready (the compile is in it: servekit is ready once the model is warmed up), req/s, p50, p99 and CPU per request.

The machine this was written on has 2 shared cores: compare the two columns of one run, not numbers across runs.
Scratch files go to --workdir.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import torch
from ab import format_row, load, start
from harness import BENCH, REPO

sys.path.insert(0, str(REPO))
sys.path.insert(0, str(BENCH))
from models import build, in_features  # ../shared/bench/models.py

from servekit import archiver, pt2

MODEL_PY = '''
from torch import nn


class W2(nn.Module):
    """The W2 MLP of ../shared/bench/models.py, whose state dict it loads."""

    def __init__(self):
        super().__init__()
        sizes = (512, 2048, 2048, 512, 10)
        layers = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(sizes) - 2:
                layers.append(nn.ReLU())
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)
'''
HANDLER_PY = """
import torch
from ts.torch_handler.base_handler import BaseHandler


class W2Handler(BaseHandler):
    def preprocess(self, data):
        return torch.tensor([(row.get("body") or row.get("data"))["data"] for row in data], dtype=torch.float32)
"""


def compile_options(args: argparse.Namespace) -> dict[str, Any]:
    options: dict[str, Any] = {"enable": True, "backend": args.backend}
    if args.mode:
        options["mode"] = args.mode
    if args.options:
        options["options"] = json.loads(args.options)
    return options


def in_process(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    eager = build("w2")
    config = {"pt2": {"compile": compile_options(args)}, "inputs": [{"name": "x", "shape": [-1, in_features("w2")]}]}
    started = time.perf_counter()
    compiled = pt2.prepare(build("w2"), pt2.read_settings(config), torch.device("cpu"))
    print(
        f"in process: compile + warm-up {time.perf_counter() - started:.1f} s ({config['pt2']}), "
        f"{args.threads} torch thread(s)",
        flush=True,
    )
    models = {"eager": eager, "compiled": compiled}
    batches = [int(b) for b in args.batches.split(",")]
    inputs = {b: torch.randn(b, in_features("w2"), generator=torch.Generator().manual_seed(b)) for b in batches}
    with torch.inference_mode():
        for b in batches:
            assert torch.allclose(eager(inputs[b]), compiled(inputs[b]), atol=1e-4), f"batch {b}: answers differ"
    medians: dict[tuple[str, int], list[float]] = {}
    for round_ in range(args.rounds):
        order = list(models) if round_ % 2 == 0 else list(reversed(models))
        for name in order:
            for b in batches:
                medians.setdefault((name, b), []).append(forward_ms(models[name], inputs[b], args.seconds))
    print(f"{'batch':>5} {'eager ms':>9} {'compiled ms':>12} {'eager samples/s':>16} {'compiled samples/s':>19} ratio")
    for b in batches:
        e, c = (statistics.median(medians[(name, b)]) for name in ("eager", "compiled"))
        print(f"{b:>5} {e:>9.3f} {c:>12.3f} {b / e * 1000:>16.0f} {b / c * 1000:>19.0f} {e / c:5.2f}x", flush=True)


def forward_ms(model: Any, x: torch.Tensor, seconds: float) -> float:
    """The median time of one forward, in ms, over ``seconds`` (after a few unmeasured calls)."""
    times = []
    with torch.inference_mode():
        for _ in range(3):
            model(x)
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            t = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


def archives(args: argparse.Namespace) -> dict[str, Path]:
    """Per variant, a work folder as ``ab.start`` wants it: ``models/`` (the harness's bodies) and ``store/w2.mar``."""
    work = args.workdir
    models = work / "models"
    if not (models / "w2_state.pt").exists():
        env = {**os.environ, "BENCH_WORKDIR": str(work)}
        subprocess.run([sys.executable, BENCH / "run.py", "prepare"], check=True, env=env, capture_output=True)
    src = work / "src"
    src.mkdir(parents=True, exist_ok=True)
    (src / "w2_model.py").write_text(MODEL_PY)
    (src / "w2_handler.py").write_text(HANDLER_PY)
    inputs = "inputs:\n  - {name: x, datatype: FP32, shape: [-1, 512]}\n"
    configs = {"eager": inputs, "compiled": "pt2:\n  compile: " + json.dumps(compile_options(args)) + "\n" + inputs}
    folders = {}
    for name, config in configs.items():
        folder = work / name
        (folder / "store").mkdir(parents=True, exist_ok=True)
        if not (folder / "models").exists():
            (folder / "models").symlink_to(models)
        (src / f"{name}.yaml").write_text(config)
        argv = ["--model-name", "w2", "--version", "1.0", "--model-file", str(src / "w2_model.py"), "--force"]
        argv += ["--serialized-file", str(models / "w2_state.pt"), "--handler", str(src / "w2_handler.py")]
        argv += ["--config-file", str(src / f"{name}.yaml"), "--export-path", str(folder / "store")]
        assert archiver.main(argv) == 0
        folders[name] = folder
    return folders


def answer(url: str, body: bytes) -> list[float]:
    request = urllib.request.Request(url, body, {"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())  # type: ignore[no-any-return]


def through_servekit(args: argparse.Namespace) -> None:
    folders = archives(args)
    body_file = args.workdir / "models" / "w2_body.json"
    body = body_file.read_bytes()
    with torch.inference_mode():
        expected = build("w2")(torch.tensor([json.loads(body)["data"]])).tolist()[0]
    results: dict[tuple[str, int], list[dict[str, float]]] = {}
    ready: dict[str, list[float]] = {}
    for round_ in range(args.rounds):
        order = list(folders) if round_ % 2 == 0 else list(reversed(folders))
        for name in order:
            started = time.monotonic()
            process, url = start(name, f"{REPO}+enable_grpc=false", folders[name], "w2")  # gRPC's fixed ports
            ready.setdefault(name, []).append(time.monotonic() - started)
            print(f"round {round_} {name:>8} start to ready {ready[name][-1]:.1f} s", flush=True)
            try:
                got = answer(url, body)
                assert torch.allclose(torch.tensor(got), torch.tensor(expected), atol=1e-4), (name, got, expected)
                load(url, body_file, 8, 2, process.pid)  # warm-up of the server, as ab.py
                for clients in (int(c) for c in args.clients.split(",")):
                    row = load(url, body_file, clients, args.server_seconds, process.pid)
                    results.setdefault((name, clients), []).append(row)
                    print(f"round {round_} {name:>8} c={clients:<3} " + format_row(row), flush=True)
            finally:
                process.send_signal(signal.SIGTERM)
                process.wait(60)
    print(f"servekit, medians over {args.rounds} round(s), {args.server_seconds} s per cell:")
    for name, seconds in ready.items():  # the first start compiles from a cold cache ($TMPDIR of the run folder)
        print(f"{name:>8} start to ready: first {seconds[0]:.1f} s, median {statistics.median(seconds):.1f} s")
    for (name, clients), rows in sorted(results.items(), key=lambda item: (item[0][1], item[0][0])):
        median = {key: statistics.median(r[key] for r in rows) for key in rows[0]}
        print(f"{name:>8} c={clients:<3} " + format_row(median))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default="inductor", help="torch.compile's backend (pt2.compile.backend)")
    parser.add_argument("--mode", default=None, help="torch.compile's mode (pt2.compile.mode); default: torch's")
    parser.add_argument("--options", default=None, help="torch.compile's options as JSON: '{\"freezing\": true}'")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in process")
    parser.add_argument("--batches", default="1,8,64", help="batch sizes in process")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3, help="per batch size, variant and round, in process")
    parser.add_argument("--clients", default="64,1", help="wrk connection counts through servekit")
    parser.add_argument("--server-seconds", type=int, default=8, help="per wrk cell")
    parser.add_argument("--no-server", action="store_true", help="measure in process only")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/servekit-pt2-bench"))
    args = parser.parse_args()
    in_process(args)
    if not args.no_server:
        through_servekit(args)


if __name__ == "__main__":
    main()
