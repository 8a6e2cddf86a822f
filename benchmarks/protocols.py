"""The same model over every inference protocol on one servekit start (issue 16): TorchServe's ``/predictions``, the
Open Inference Protocol's ``/v2/models/{m}/infer`` with JSON tensors and with the binary tensor extension, and
KServe v1's ``:predict``, each as the same W1 request (16 floats), wrk at --clients connections, the routes in a
different order each round; the median requests/s and the median of each round's ratio to ``/predictions``.

    python benchmarks/protocols.py [--rounds 3] [--duration 8] [--clients 64] [--project DIR] [--json FILE]

Run it with the peers venv's Python (``benchmarks/setup_peers.sh``), as the other scripts here; the harness of
../shared/bench starts servekit with the workload's .mar (1 worker, 1 torch thread, batch 8, 5 ms).
"""

from __future__ import annotations

import argparse
import json
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from harness import BENCH, REPO, load_harness

HEADER_LENGTH = "Inference-Header-Content-Length"


def bodies(workdir: Path, workload: str) -> dict[str, tuple[str, Path, dict[str, str]]]:
    """Each route's path suffix, body file and extra headers, for the workload's sample request."""
    base = workdir / "models"
    sample = json.loads((base / f"{workload}_body.json").read_text())["data"]
    tensor = {"name": "input-0", "shape": [1, len(sample)], "datatype": "FP32"}
    out = base / "protocols"
    out.mkdir(exist_ok=True)
    (out / "v2.json").write_text(json.dumps({"inputs": [{**tensor, "data": sample}]}))
    raw = struct.pack(f"<{len(sample)}f", *sample)
    head = json.dumps({"inputs": [{**tensor, "parameters": {"binary_data_size": len(raw)}}]}).encode()
    (out / "v2.bin").write_bytes(head + raw)
    (out / "v1.json").write_text(json.dumps({"instances": [sample]}))
    return {
        "/predictions": (f"/predictions/{workload}", base / f"{workload}_body.json", {}),
        "v2 JSON": (f"/v2/models/{workload}/infer", out / "v2.json", {}),
        "v2 binary": (f"/v2/models/{workload}/infer", out / "v2.bin", {HEADER_LENGTH: str(len(head))}),
        "v1": (f"/v1/models/{workload}:predict", out / "v1.json", {}),
    }


def wrk_script(workdir: Path, name: str, headers: dict[str, str]) -> Path:
    """The reference harness's post.lua with ``headers`` added."""
    lines = [f'wrk.headers["{k}"] = "{v}"' for k, v in headers.items()]
    path = workdir / "models" / "protocols" / f"{name.replace(' ', '_').strip('/')}.lua"
    path.write_text((BENCH / "post.lua").read_text() + "\n" + "\n".join(lines) + "\n")
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", default="w1")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--duration", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", default=None)
    ap.add_argument("--project", default=str(REPO), help="the servekit checkout to measure (default: this one)")
    args = ap.parse_args()
    h = load_harness()
    cfg = h.parse_args(["compare", "--project", args.project])
    h.cmd_prepare(cfg)
    h.setup_servekit(cfg)
    srv, url, _info, _describe = h.servekit_server(cfg, args.workload, 8)
    base = url.split("/predictions/")[0]
    routes = bodies(Path(cfg.workdir), args.workload)
    rates: dict[str, list[float]] = {name: [] for name in routes}
    srv.start()
    try:
        h.wait_ready(url, routes["/predictions"][1].read_bytes(), srv.proc)
        for name, (path, body, headers) in routes.items():  # each route answers 200 (and warms up)
            script = wrk_script(Path(cfg.workdir), name, headers)
            cmd = [cfg.wrk, "-t1", "-c8", "-d2s", "-s", str(script), base + path, "--", str(body)]
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            result = json.loads(done.stdout.split("WRK_JSON ")[1].splitlines()[0])
            if result["err_status"] or not result["requests"]:
                sys.exit(f"ERROR: {name} does not answer 200: {done.stdout[-500:]}")
        names = list(routes)
        for rnd in range(args.rounds):
            for name in names[rnd % len(names) :] + names[: rnd % len(names)]:
                path, body, headers = routes[name]
                script = wrk_script(Path(cfg.workdir), name, headers)
                cmd = [cfg.wrk, "-t1", f"-c{args.clients}", f"-d{args.duration}s", "-s", str(script), base + path]
                done = subprocess.run([*cmd, "--", str(body)], capture_output=True, text=True, check=False)
                result = json.loads(done.stdout.split("WRK_JSON ")[1].splitlines()[0])
                rate = (result["requests"] - result["err_status"]) / (result["duration_us"] / 1e6)
                rates[name].append(rate)
                print(f"round {rnd + 1} {name:12s} {rate:9.0f} req/s (non-2xx {result['err_status']})", flush=True)
                time.sleep(1)
    finally:
        srv.stop()
    table: list[dict[str, Any]] = []
    print(
        f"\n| route ({args.workload}, {args.clients} clients) | req/s (median) | / `/predictions` (median of rounds) |"
    )
    print("| --- | --- | --- |")
    for name, values in rates.items():
        ratio = statistics.median(v / p for v, p in zip(values, rates["/predictions"], strict=True))
        table.append({"route": name, "req_per_s": statistics.median(values), "ratio": ratio, "rounds": values})
        print(f"| {name} | {statistics.median(values):.0f} | {ratio:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(table, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
