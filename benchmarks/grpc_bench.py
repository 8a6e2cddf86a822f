"""TorchServe's gRPC inference API under load (issue 15): servekit and TorchServe 0.12 side by side, the same .mar,
handler and settings as run.sh (1 worker, 1 torch thread, batch 8, max delay 5 ms), and servekit's REST
``/predictions`` in the same server start for the ratio.

    python benchmarks/grpc_bench.py [--servers servekit,torchserve] [--workloads w1] [--rounds 3] [--json FILE]

The load generator is h2load (nghttp2, C; Debian's ``nghttp2-client``), which speaks HTTP/2 and so gRPC's unary
calls: a POST of the length-prefixed ``PredictionsRequest`` (encoded here by hand: model name, and the input
``data`` holding the workload's JSON body, as a TorchServe gRPC client sends it) to
``/org.pytorch.serve.grpc.inference.InferenceAPIsService/Predictions``. h2load counts HTTP statuses, not gRPC's, so
before each measurement one call is checked with curl (``grpc-status: 0`` and a prediction in the answer). Cells:
--clients connections with one stream each (as wrk's clients) and one connection carrying --clients streams; then
wrk on ``/predictions`` at --clients connections for the ratio. Servers alternate each round.

Run it through ``benchmarks/grpc_bench.sh`` (installs h2load, wrk, the peers venv and the project).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

from harness import REPO, load_harness

METHOD = "/org.pytorch.serve.grpc.inference.InferenceAPIsService/Predictions"
GRPC_PORT = 17070


def field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field."""
    size, length = len(payload), b""
    while True:
        byte, size = size & 0x7F, size >> 7
        length += bytes([byte | (0x80 if size else 0)])
        if not size:
            return bytes([number << 3 | 2]) + length + payload


def grpc_body(model: str, data: bytes) -> bytes:
    """A gRPC message frame holding ``PredictionsRequest{model_name: model, input: {"data": data}}``."""
    message = field(1, model.encode()) + field(3, field(1, b"data") + field(2, data))
    return b"\0" + len(message).to_bytes(4, "big") + message


def check_call(url: str, body: Path) -> None:
    """One call with curl: exits unless it ends with grpc-status 0 and a prediction."""
    done = subprocess.run(
        ["curl", "-sS", "--http2-prior-knowledge", "-D", "-", "-o", "/dev/null", "-H", "content-type: application/grpc",
         "-H", "te: trailers", "--data-binary", f"@{body}", url],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    if "grpc-status: 0" not in done.stdout.lower():
        sys.exit(f"ERROR: the gRPC check call to {url} failed:\n{done.stdout}{done.stderr}")


def h2load(url: str, body: Path, clients: int, streams: int, seconds: int) -> dict[str, Any]:
    cmd = ["h2load", "-D", str(seconds), "--warm-up-time", "1", "-c", str(clients), "-m", str(streams), "-t", "1"]
    cmd += ["-d", str(body), "-H", "content-type: application/grpc", "-H", "te: trailers", url]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False).stdout
    rate = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out)
    done = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded", out)
    mean = re.search(r"time for request:\s+\S+\s+\S+\s+(\S+)", out)
    if rate is None or done is None:
        sys.exit(f"ERROR: cannot read h2load's output:\n{out}")
    return {
        "req_per_s": float(rate.group(1)),
        "not_2xx": int(done.group(1)) - int(done.group(2)),
        "mean_latency": mean.group(1) if mean else None,
    }


def measure(h: ModuleType, cfg: Any, args: argparse.Namespace, server: str, workload: str) -> dict[str, Any]:
    make = h.servekit_server if server == "servekit" else h.torchserve_server
    srv, url, _info, _describe = make(cfg, workload, 8)
    props = Path(srv.cwd) / "config.properties"
    extra = f"grpc_inference_port={GRPC_PORT}\ngrpc_management_port={GRPC_PORT + 1}\n"
    props.write_text(props.read_text() + extra + ("enable_grpc=true\n" if server == "servekit" else ""))
    body_json = Path(cfg.workdir) / "models" / f"{workload}_body.json"
    body = Path(cfg.workdir) / "models" / f"{workload}_grpc.bin"
    body.write_bytes(grpc_body(workload, body_json.read_bytes()))
    grpc_url = f"http://127.0.0.1:{GRPC_PORT}{METHOD}"
    out: dict[str, Any] = {"server": server, "workload": workload}
    srv.start()
    try:
        h.wait_ready(url, body_json.read_bytes(), srv.proc)
        check_call(grpc_url, body)
        h2load(grpc_url, body, 8, 1, 3)  # warm-up
        out["grpc_conns"] = h2load(grpc_url, body, args.clients, 1, args.duration)
        out["grpc_streams"] = h2load(grpc_url, body, 1, args.clients, args.duration)
        r = h.run_wrk(cfg, url, body_json, args.clients, args.duration)
        out["rest_req_per_s"] = round((r["requests"] - r["err_status"]) / (r["duration_us"] / 1e6), 1)
        print(f"{server:10s} {workload} {json.dumps(out)}", flush=True)
    finally:
        srv.stop()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--servers", default="servekit,torchserve")
    ap.add_argument("--workloads", default="w1")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", default=None)
    ap.add_argument("--project", default=str(REPO), help="the servekit checkout to measure (default: this one)")
    args = ap.parse_args()
    h = load_harness()
    cfg = h.parse_args(["compare", "--project", args.project])
    h.cmd_prepare(cfg)
    servers = args.servers.split(",")
    if "servekit" in servers:
        h.setup_servekit(cfg)
    results = []
    for rnd in range(args.rounds):
        for workload in args.workloads.split(","):
            for server in servers[rnd % len(servers) :] + servers[: rnd % len(servers)]:
                results.append(dict(measure(h, cfg, args, server, workload), round=rnd + 1))
                time.sleep(2)
    print("\n| workload | server | gRPC req/s, N conns | gRPC req/s, 1 conn x N streams | REST req/s | gRPC / REST |")
    print("| --- | --- | --- | --- | --- | --- |")
    for workload in args.workloads.split(","):
        for server in servers:
            rows = [r for r in results if r["server"] == server and r["workload"] == workload]
            conns = statistics.median(r["grpc_conns"]["req_per_s"] for r in rows)
            streams = statistics.median(r["grpc_streams"]["req_per_s"] for r in rows)
            rest = statistics.median(r["rest_req_per_s"] for r in rows)
            print(f"| {workload} | {server} | {conns:.0f} | {streams:.0f} | {rest:.0f} | {conns / rest:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
