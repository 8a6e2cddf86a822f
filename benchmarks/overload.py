"""Goodput past capacity (issue 13): requests answered 200 per second when more is offered than the server can serve,
servekit and TorchServe 0.12 side by side, on the reference workloads of ../shared/bench.

    python benchmarks/overload.py [--servers servekit,torchserve] [--workloads w1,w2] [--rounds 3] [--json FILE]

Each server gets the harness's .mar, handler file and config.properties (1 worker, 1 torch thread, batch 8, max delay
5 ms) plus `jobQueueSize` = --queue (64). Per round, workload and server (the order alternates each round):

* closed loop (wrk, post.lua): --conns (64 = capacity, nothing shed; then 256 and 1,024), then 64 again; a cell's
  goodput is its answered-200/s over the mean of the two capacity cells of the same server start;
* open loop: --open-factor (2) x the capacity just measured, for --open-seconds (60), from benchmarks/openloop.c
  (compiled on first use with cc: --open-workers clients on staggered ticks, each request sent when it is due on its
  client's keep-alive connection, or another idle one, or a new one, at most --open-conns; one C thread, a few us of
  CPU per request) or, with --open-tool hey, from hey -q (Go: --open-workers workers, each waiting for its answer, so
  a server that holds a refused connection back also slows its worker, and hey costs ~100 us of CPU per request, too
  much to offer W1's 2x on two cores); per-request rows
  give 200/s, 503/s, other, the median latency of the 503s, the worst 1-s window of 200s after the first 5 s, the
  rate achieved and the generator's CPU;
* recovery: right after the open loop, closed loop at 64 connections (hey -o csv); the first second whose 200s
  reach 90 % of capacity, and the front end's RSS and open descriptors before the overload and after recovery;
* servekit only: the worker's busy fraction (handler time / wall time, from /metrics) in each cell.

With --multi, each server also serves a second copy of the model (`<w>b`, its own worker): the first is driven at
1,024 connections while the second gets a light open-loop load (--multi-rate req/s); the second's p50/p99 with and
without the first overloaded are printed.

Run it through `benchmarks/overload.sh` (installs wrk and hey, the peers venv and the project).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import resource
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import ModuleType
from typing import Any

from harness import BENCH, REPO, load_harness

Row = tuple[float, int, float]  # a request hey sent: offset (s), status (0: no answer), latency (s)


def hey(
    url: str, body: Path, seconds: float, workers: int, rate_per_worker: float | None, phases: int = 1
) -> tuple[list[Row], float]:
    """Every request hey sent, sorted by offset, and hey's own CPU seconds. With a rate, the workers of one hey tick
    in step (each starts its ticker as it starts), so the rate arrives as bursts of ``workers`` requests; ``phases``
    hey processes, each with its share of the workers and started 1/phases of a tick apart, offer it smoother."""
    cmd = ["hey", "-z", f"{seconds}s", "-c", str(workers // phases), "-m", "POST", "-T", "application/json"]
    cmd += ["-D", str(body), "-t", "10", "-o", "csv"] + (["-q", f"{rate_per_worker:.3f}"] if rate_per_worker else [])
    tick = 1 / rate_per_worker if rate_per_worker else 0.0
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    procs = []
    start = time.perf_counter()
    for i in range(phases):
        time.sleep(max(0.0, start + i * tick / phases - time.perf_counter()))
        delay = time.perf_counter() - start
        procs.append(
            (delay, subprocess.Popen([*cmd, url], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True))
        )
    rows = [
        (delay + float(row["offset"]), int(row.get("status-code") or 0), float(row["response-time"]))
        for delay, proc in procs
        for row in csv.DictReader(io.StringIO(proc.communicate()[0]))
    ]
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return sorted(rows), after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime


def openloop(
    url: str, body: Path, seconds: float, rate: float, clients: int, max_conns: int, workdir: Path
) -> tuple[list[Row], float]:
    """Every request benchmarks/openloop.c offered at ``rate`` (status -1: no connection was free to send it on), and
    its CPU seconds."""
    binary = workdir / "openloop"
    source = Path(__file__).with_name("openloop.c")
    if not binary.exists() or binary.stat().st_mtime < source.stat().st_mtime:
        subprocess.run(["cc", "-O2", "-o", str(binary), str(source)], check=True)
    host_port, _, path = url.removeprefix("http://").partition("/")
    host, _, port = host_port.partition(":")
    cmd = [
        str(binary),
        host,
        port,
        "/" + path,
        str(body),
        f"{rate:.1f}",
        str(seconds),
        str(clients),
        str(max_conns),
        "10",
    ]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True).stdout
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    rows = [
        (float(row["offset"]), int(row["status-code"]), float(row["response-time"]))
        for row in csv.DictReader(io.StringIO(out))
    ]
    return rows, after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime


def recovery(url: str, body: Path) -> dict[str, Any]:
    """Right after an overload: a closed loop of 64 workers (within capacity) for 6 s. Full service is back at the end
    of the last half second with a request that was not answered 200, or answered 200 more than 10x slower than the
    run's median (0: from the start)."""
    rows, _ = hey(url, body, 6, 64, None)
    median = statistics.median(r[2] for r in rows) if rows else 0.0
    late = [r[0] for r in rows if r[1] != 200 or r[2] > 10 * median]
    windows = [sum(1 for r in rows if int(r[0] * 2) == i and r[1] == 200) * 2 for i in range(12)]
    return {"recovery_s": math.floor(max(late) * 2 + 1) / 2 if late else 0.0, "recovery_200_per_s": windows}


def summarize_open(rows: list[Row], seconds: float, capacity: float) -> dict[str, Any]:
    ok = [r for r in rows if r[1] == 200]
    shed = [r for r in rows if r[1] == 503]
    windows = [0] * max(1, int(seconds))
    for offset, _status, _ in ok:
        if int(offset) < len(windows):
            windows[int(offset)] += 1
    steady = windows[5:] or windows
    sent = [r for r in rows if r[1] != -1]
    return {
        "achieved_per_s": round(len(sent) / seconds, 1),
        "unsent": len(rows) - len(sent),
        "ok_per_s": round(len(ok) / seconds, 1),
        "shed_per_s": round(len(shed) / seconds, 1),
        "other": len(sent) - len(ok) - len(shed),
        "goodput": round(len(ok) / seconds / capacity, 3) if capacity else 0.0,
        "worst_second_goodput": round(min(steady) / capacity, 3) if capacity else 0.0,
        "shed_p50_ms": round(statistics.median(r[2] for r in shed) * 1000, 3) if shed else None,
        "ok_p50_ms": round(statistics.median(r[2] for r in ok) * 1000, 3) if ok else None,
        "ok_p99_ms": round(quantile([r[2] for r in ok], 0.99) * 1000, 3) if ok else None,
    }


def quantile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def handler_seconds(port: int) -> float:
    """servekit's total handler time so far (``servekit_handler_time_seconds_sum``; 0 on TorchServe)."""
    family = "servekit_handler_time_seconds"
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics?name[]={family}", timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return 0.0
    return sum(float(ln.rpartition(" ")[2]) for ln in text.splitlines() if ln.startswith(family + "_sum{"))


def front_end(h: ModuleType, srv: Any, port: int) -> Any:
    """The process of the tree that listens on the inference port (servekit's server, TorchServe's JVM)."""
    return next((p for p in h.proc_tree(srv.proc.pid) if h.listens_on(p, port)), None)


def resources(proc: Any) -> dict[str, float]:
    try:
        return {"rss_mib": round(proc.memory_info().rss / 2**20, 1), "fds": proc.num_fds()}
    except Exception:  # a gone process: nothing to report
        return {}


def measure(h: ModuleType, cfg: Any, args: argparse.Namespace, server: str, workload: str) -> dict[str, Any]:
    make = h.servekit_server if server == "servekit" else h.torchserve_server
    srv, url, _info, _describe = make(cfg, workload, 8)
    props = Path(srv.cwd) / "config.properties"
    text = props.read_text().replace('"responseTimeout": 120', f'"responseTimeout": 120, "jobQueueSize": {args.queue}')
    second = f"{workload}b"
    if args.multi:  # a second copy of the model, with its own worker and queue
        models = json.loads(text.split("models=", 1)[1].splitlines()[0])
        models[second] = {"1.0": dict(models[workload]["1.0"])}
        text = text.split("models=", 1)[0] + "models=" + json.dumps(models) + "\n"
        i = srv.cmd.index("--models")
        srv.cmd[i + 1 : i + 2] = [f"{workload}={workload}.mar", f"{second}={workload}.mar"]
    props.write_text(text)
    body = Path(cfg.workdir) / "models" / f"{workload}_body.json"
    port = int(url.split(":")[2].split("/")[0])
    metrics_port = port + 2
    out: dict[str, Any] = {"server": server, "workload": workload, "queue": args.queue, "closed": [], "open": None}
    srv.start()
    try:
        h.wait_ready(url, body.read_bytes(), srv.proc)
        if args.multi:
            h.wait_ready(url + "b", body.read_bytes(), srv.proc)
        h.run_wrk(cfg, url, body, 8, 3)  # warm-up
        front = front_end(h, srv, port)
        for conns in [*args.conns, args.conns[0]]:
            busy0, cpu0, t0 = handler_seconds(metrics_port), cpu(h, srv), time.time()
            r = h.run_wrk(cfg, url, body, conns, args.duration)
            wall = time.time() - t0
            secs = r["duration_us"] / 1e6
            cell = {
                "conns": conns,
                "ok_per_s": round((r["requests"] - r["err_status"]) / secs, 1),
                "shed_per_s": round(r["err_status"] / secs, 1),
                "p50_ms": r["p50_us"] / 1000,
                "p99_ms": r["p99_us"] / 1000,
                "socket_errors": r["err_connect"] + r["err_read"] + r["err_write"] + r["err_timeout"],
                "server_cpu_pct": round((cpu(h, srv) - cpu0) / wall * 100),
                "worker_busy_pct": round((handler_seconds(metrics_port) - busy0) / wall * 100),
            }
            out["closed"].append(cell)
            say(server, workload, f"c={conns:5d}", cell)
        capacity = (out["closed"][0]["ok_per_s"] + out["closed"][-1]["ok_per_s"]) / 2
        for cell in out["closed"]:
            cell["goodput"] = round(cell["ok_per_s"] / capacity, 3)
        out["capacity_per_s"] = capacity
        if args.open_seconds > 0:
            before = resources(front)
            target = args.open_factor * capacity
            busy0, cpu0, t0 = handler_seconds(metrics_port), cpu(h, srv), time.time()
            if args.open_tool == "hey":
                rows, gen_cpu = hey(
                    url, body, args.open_seconds, args.open_workers, target / args.open_workers, args.open_phases
                )
            else:
                rows, gen_cpu = openloop(
                    url, body, args.open_seconds, target, args.open_workers, args.open_conns, Path(cfg.workdir)
                )
            wall = time.time() - t0
            cell = summarize_open(rows, args.open_seconds, capacity)
            cell.update(
                offered_target_per_s=round(target, 1),
                server_cpu_pct=round((cpu(h, srv) - cpu0) / wall * 100),
                generator_cpu_pct=round(gen_cpu / wall * 100),
                worker_busy_pct=round((handler_seconds(metrics_port) - busy0) / wall * 100),
            )
            cell.update(recovery(url, body), resources_before=before)
            time.sleep(1)
            cell["resources_after"] = resources(front)
            out["open"] = cell
            say(server, workload, f"open x{args.open_factor:g}", cell)
        if args.multi:
            out["multi"] = multi(h, cfg, args, url, body)
            print(f"{server:10s} {workload} multi     {out['multi']}", flush=True)
    finally:
        srv.stop()
    return out


def multi(h: ModuleType, cfg: Any, args: argparse.Namespace, url: str, body: Path) -> dict[str, Any]:
    """The second model's latency under a light load, alone and while the first is driven at 1,024 connections."""
    workers = 4
    quiet, _ = hey(url + "b", body, args.duration, workers, args.multi_rate / workers)
    load = subprocess.Popen(
        [cfg.wrk, "-t1", "-c1024", f"-d{args.duration + 2}s", "-s", str(BENCH / "post.lua"), url, "--", str(body)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(1)
        loud, _ = hey(url + "b", body, args.duration, workers, args.multi_rate / workers)
    finally:
        load.wait()

    def stats(rows: list[Row]) -> dict[str, Any]:
        ok = [r[2] for r in rows if r[1] == 200]
        return {
            "ok": len(ok),
            "not_ok": len(rows) - len(ok),
            "p50_ms": round(statistics.median(ok) * 1000, 2) if ok else None,
            "p99_ms": round(quantile(ok, 0.99) * 1000, 2) if ok else None,
        }

    return {"second_alone": stats(quiet), "second_while_first_overloaded": stats(loud)}


def cpu(h: ModuleType, srv: Any) -> float:
    return float(h.tree_cpu_seconds(h.proc_tree(srv.proc.pid)))


def say(server: str, workload: str, cell: str, values: dict[str, Any]) -> None:
    shown = {k: v for k, v in values.items() if not isinstance(v, dict)}
    print(f"{server:10s} {workload} {cell:9s} " + " ".join(f"{k}={v}" for k, v in shown.items()), flush=True)


def table(results: list[dict[str, Any]]) -> None:
    """Medians over the rounds, per workload, cell and server, with servekit's ratio to TorchServe."""
    print("\n| workload | cell | server | answered 200/s | 503/s | goodput (200/s / capacity) | p50 ms |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    keys: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for res in results:
        for cell in res["closed"][:-1]:
            keys.setdefault((res["workload"], f"c={cell['conns']}", res["server"]), []).append(cell)
        if res["open"]:
            keys.setdefault((res["workload"], "open", res["server"]), []).append(res["open"])
    for (workload, cell, server), cells in sorted(keys.items()):
        med = {k: statistics.median(c[k] for c in cells) for k in ("ok_per_s", "shed_per_s", "goodput")}
        p50 = statistics.median(c.get("p50_ms") or c.get("ok_p50_ms") or math.nan for c in cells)
        print(
            f"| {workload} | {cell} | {server} | {med['ok_per_s']:.0f} | {med['shed_per_s']:.0f} | "
            f"{med['goodput']:.3f} | {p50:.2f} |"
        )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--servers", default="servekit,torchserve")
    ap.add_argument("--workloads", default="w1,w2")
    ap.add_argument("--queue", type=int, default=64, help="jobQueueSize")
    ap.add_argument("--conns", default="64,256,1024", help="closed-loop connections; the first is the capacity cell")
    ap.add_argument("--duration", type=int, default=10, help="seconds per closed-loop cell")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--open-seconds", type=int, default=60, help="0 skips the open-loop cell")
    ap.add_argument("--open-factor", type=float, default=2.0)
    ap.add_argument("--open-tool", choices=["openloop", "hey"], default="openloop")
    ap.add_argument("--open-conns", type=int, default=4096, help="openloop: most connections open at once")
    ap.add_argument("--open-workers", type=int, default=1024, help="clients (openloop) or workers (hey)")
    ap.add_argument("--open-phases", type=int, default=8, help="hey processes, started a fraction of a tick apart")
    ap.add_argument("--multi", action="store_true", help="also a second model within its capacity")
    ap.add_argument("--multi-rate", type=float, default=200.0)
    ap.add_argument("--json", default=None)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--project", default=str(REPO), help="the servekit checkout to measure (default: this one)")
    args = ap.parse_args()
    args.conns = [int(c) for c in args.conns.split(",")]
    h = load_harness()
    argv = ["compare", "--project", args.project] + (["--workdir", args.workdir] if args.workdir else [])
    cfg = h.parse_args(argv)
    h.cmd_prepare(cfg)
    servers = args.servers.split(",")
    if "servekit" in servers:
        h.setup_servekit(cfg)
    results = []
    for rnd in range(args.rounds):
        for workload in args.workloads.split(","):
            order = servers[rnd % len(servers) :] + servers[: rnd % len(servers)]
            for server in order:
                res = measure(h, cfg, args, server, workload)
                results.append(dict(res, round=rnd + 1))
                time.sleep(2)
    table(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
