"""Scaling figures of servekit on the reference workloads of ../shared/bench (issue 7):

* W2 (compute MLP, batch 8) at 64 clients with 1 and with 2 workers, alternating each round;
* W1 (tiny MLP, batch 8, 1 worker) at 1, 64 and 256 clients: how p99 grows with the clients.

    python benchmarks/scaling.py [--repeats 3] [--duration 10] [--json FILE] [-- run.py options]

It wraps the harness's driver (`run.py servekit`, imported, never changed): the same .mar, handler file and
config.properties as `run.sh` (1 torch thread per worker, batch 8, max delay 5 ms), with minWorkers = maxWorkers =
the worker count and job_queue_size=1024 (--job-queue-size; at the default 100, 256 clients overflow the queue and
part of the load is shed with 503, which makes p99 meaningless). The driver starts, checks (correct answers),
warms up, loads (wrk + ../shared/bench/post.lua, quiet-machine wait, noisy-cell retries) and stops servekit by
PID; the workers actually running are read back from the management API. Rows also go to the driver's results
file with the tags scale-*. Run it through `benchmarks/scaling.sh` (installs wrk and the project).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from harness import BENCH, REPO, load_harness


class Runner:
    """Runs the harness's `servekit` target with a chosen worker count and collects its result rows."""

    def __init__(self, harness: ModuleType, args: argparse.Namespace, extra: list[str]) -> None:
        self.h, self.args, self.extra = harness, args, extra
        self.workers = self.round = 1
        self.kind = ""
        self.rows: list[dict[str, Any]] = []
        make = harness.SERVERS["servekit"]
        measure = harness.serve_and_measure

        def servekit_n(cfg: Any, workload: str, batch: int) -> tuple[Any, Any, Any, Any]:
            srv, url, info, describe = make(cfg, workload, batch)
            props = Path(srv.cwd) / "config.properties"
            text = props.read_text()
            one = '"minWorkers": 1, "maxWorkers": 1'
            if one not in text or "default_workers_per_model=1" not in text:
                raise RuntimeError(f"unexpected config.properties from the harness: {props}")
            n = self.workers
            text = text.replace(one, f'"minWorkers": {n}, "maxWorkers": {n}')
            text = text.replace("default_workers_per_model=1", f"default_workers_per_model={n}")
            if args.job_queue_size:
                text += f"job_queue_size={args.job_queue_size}\n"
            props.write_text(text)
            settings = info.get("settings", "").replace("workers=1", f"workers={n}")
            if args.job_queue_size:
                settings += f" job_queue_size={args.job_queue_size}"
            return srv, url, dict(info, settings=settings), describe

        def capture(*a: Any, **k: Any) -> list[dict[str, Any]]:
            out: list[dict[str, Any]] = measure(*a, **k)
            self.rows += [dict(r, scale_kind=self.kind, scale_workers=self.workers, round=self.round) for r in out]
            return out

        harness.SERVERS["servekit"] = servekit_n
        harness.serve_and_measure = capture

    def run(self, kind: str, rnd: int, workers: int, workload: str, clients: list[int]) -> None:
        self.kind, self.workers, self.round = kind, workers, rnd
        tag = f"scale{rnd}-{kind}-{workload}-k{workers}"
        sys.argv = ["run.py", "servekit", "--project", str(REPO), "--workloads", workload, "--batches", "8"]
        sys.argv += ["--concurrency", ",".join(map(str, clients)), "--duration", str(self.args.duration)]
        sys.argv += ["--tag", tag, *self.extra]
        self.h.main()


BARE = """
import json, sys, torch
sys.path.insert(0, sys.argv[3])
import ts_handler  # noqa: F401  the handler file (and models.py): what a worker imports
from models import in_features, load_model
torch.set_num_threads(1)
model = load_model(sys.argv[1], sys.argv[2], "eager")
with torch.inference_mode():
    model(torch.zeros(8, in_features(sys.argv[1])))
rss = next(int(ln.split()[1]) for ln in open("/proc/self/status") if ln.startswith("VmRSS:"))
print(json.dumps({"rss_mib": round(rss / 1024, 1)}))
"""


def bare_rss(workload: str, workdir: str) -> float | None:
    """RSS of a bare Python process with torch, the handler file, the model and one batch of 8 run: what a worker
    needs at the least, to compare a worker's RSS with."""
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    cmd = [sys.executable, "-c", BARE, workload, str(Path(workdir) / "models"), str(BENCH)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    try:
        return float(json.loads(out.stdout.strip().splitlines()[-1])["rss_mib"])
    except (ValueError, IndexError, KeyError):
        print(f"bare process for {workload} failed: {(out.stdout + out.stderr)[-300:]}", file=sys.stderr)
        return None


def valid(r: dict[str, Any]) -> bool:
    return "failed" not in r and bool(r.get("check_ok")) and r["errors"] == 0 and r["non2xx"] == 0


def med(vals: list[float]) -> float | None:
    return statistics.median(vals) if vals else None


def fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def worker_rss(r: dict[str, Any]) -> list[float]:
    return [p["rss_mib"] for p in r.get("procs") or [] if p["role"] == "worker"]


def summarise(rows: list[dict[str, Any]], key: Any) -> dict[str, Any]:
    """Per key(row): runs, medians of the valid ones, failures and the memory of each start."""
    out: dict[Any, dict[str, Any]] = {}
    for r in rows:
        k = key(r)
        if k is None:
            continue
        e = out.setdefault(k, {"runs": [], "bad": []})
        if valid(r):
            e["runs"].append(r)
        else:
            why = r.get("failed") or f"check_ok={r.get('check_ok')} errors={r['errors']} non2xx={r['non2xx']}"
            e["bad"].append(why)
    for e in out.values():
        ok = e["runs"]
        e["median"] = {f: med([r[f] for r in ok]) for f in ("rps", "p50_ms", "p99_ms")}
        e["frontend_rss_mib"] = med([r["frontend_rss_mib"] for r in ok if r.get("frontend_rss_mib")])
        per_worker = [x for r in ok for x in worker_rss(r)]
        e["worker_rss_mib"] = med(per_worker)
        e["workers_running"] = sorted({r.get("mgmt_workers") for r in ok if r.get("mgmt_workers") is not None})
    return out


def render(
    rows: list[dict[str, Any]], args: argparse.Namespace, bare: dict[str, float | None]
) -> tuple[str, dict[str, Any]]:
    w2 = summarise(rows, lambda r: r["scale_workers"] if r["scale_kind"] == "workers" else None)
    w1 = summarise(rows, lambda r: r.get("concurrency") if r["scale_kind"] == "clients" else None)
    q = f", job_queue_size {args.job_queue_size}" if args.job_queue_size else ""
    lines = [
        f"servekit scaling: {args.repeats} round(s), {args.duration} s per cell, batch 8, delay 5 ms, "
        f"1 torch thread per worker{q}; medians over the valid runs",
        "",
        f"W2 at {args.w2_clients} clients by worker count (workers running: read back from the management API)",
        "",
        "| workers | req/s per round | median req/s | p50 ms | p99 ms | front end RSS MiB | RSS per worker MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for n in sorted(w2):
        e = w2[n]
        per = ", ".join(f"{r['rps']:.0f}" for r in e["runs"]) + "".join(" FAILED" for _ in e["bad"])
        running = "" if e["workers_running"] in ([], [n]) else f" (running: {e['workers_running']})"
        m = e["median"]
        lines.append(
            f"| {n}{running} | {per} | {fmt(m['rps'], '.0f')} | {fmt(m['p50_ms'], '.1f')} | {fmt(m['p99_ms'], '.1f')} "
            f"| {fmt(e['frontend_rss_mib'], '.0f')} | {fmt(e['worker_rss_mib'], '.0f')} |"
        )
    by_round = {(r["scale_workers"], r["round"]): r["rps"] for e in w2.values() for r in e["runs"]}
    per_round = [
        by_round[(2, k)] / by_round[(1, k)]
        for k in range(1, args.repeats + 1)
        if (1, k) in by_round and (2, k) in by_round
    ]
    if per_round:
        lines += [
            "",
            f"2 workers / 1 worker: x{med(per_round):.2f} (per round {', '.join(f'{v:.2f}' for v in per_round)})",
        ]
    lines += [
        "",
        f"{args.sweep_workload.upper()} with 1 worker by clients",
        "",
        "| clients | median req/s | p50 ms | p99 ms | p99 / p99 at 1 client | p99 per round | invalid runs |",
        "|---|---|---|---|---|---|---|",
    ]
    base = w1.get(1, {}).get("median", {}).get("p99_ms")
    for c in sorted(w1):
        e = w1[c]
        m = e["median"]
        growth = f"x{m['p99_ms'] / base:.1f}" if base and m["p99_ms"] else "-"
        per = ", ".join(f"{r['p99_ms']:.1f}" for r in e["runs"]) or "-"
        bad = "; ".join(b[:120] for b in e["bad"]) or "0"
        lines.append(
            f"| {c} | {fmt(m['rps'], '.0f')} | {fmt(m['p50_ms'], '.2f')} | {fmt(m['p99_ms'], '.1f')} | {growth} "
            f"| {per} | {bad} |"
        )
    if w1:
        last = w1[max(w1)]
        lines += [
            "",
            f"After {max(w1)} clients: front end RSS {fmt(last['frontend_rss_mib'], '.0f')} MiB, "
            f"worker {fmt(last['worker_rss_mib'], '.0f')} MiB",
        ]
    if any(bare.values()):
        lines += [
            "",
            "Bare process (python + torch + handler file + model, one batch of 8 run; what a worker needs at the "
            "least), RSS MiB: " + ", ".join(f"{w.upper()} {fmt(v, '.0f')}" for w, v in bare.items()),
        ]
    report = {
        "bare_process_rss_mib": bare,
        "w2_by_workers": {str(k): {kk: v for kk, v in e.items() if kk != "runs"} for k, e in w2.items()},
        "w2_ratio_2_over_1": {"median": med(per_round), "per_round": per_round},
        f"{args.sweep_workload}_by_clients": {
            str(k): {kk: v for kk, v in e.items() if kk != "runs"} for k, e in w1.items()
        },
    }
    return "\n".join(lines), report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3, help="rounds (the worker order alternates)")
    ap.add_argument("--duration", type=int, default=10, help="seconds per cell")
    ap.add_argument("--workers", default="1,2", help="W2 worker counts")
    ap.add_argument("--w2-clients", type=int, default=64)
    ap.add_argument("--sweep-workload", default="w1", choices=["w1", "w2"])
    ap.add_argument("--sweep-clients", default="1,64,256")
    ap.add_argument(
        "--job-queue-size",
        type=int,
        default=1024,
        help="job_queue_size for these runs (default 1024, so that 256 clients queue instead of being shed with "
        "503: servekit's default, like TorchServe's, is 100); 0 keeps the server's default",
    )
    ap.add_argument("--json", default=None, help="write the summary as JSON here")
    args, extra = ap.parse_known_args()
    extra = [a for a in extra if a != "--"]
    counts = [int(x) for x in args.workers.split(",")]
    clients = [int(x) for x in args.sweep_clients.split(",")]
    runner = Runner(load_harness(), args, extra)
    workdir = extra[extra.index("--workdir") + 1] if "--workdir" in extra[:-1] else None
    workdir = workdir or os.environ.get("BENCH_WORKDIR", "/tmp/anchors")  # the harness's default
    bare: dict[str, float | None] = {}
    try:
        for r in range(1, args.repeats + 1):
            k = (r - 1) % len(counts)
            for n in counts[k:] + counts[:k]:
                runner.run("workers", r, n, "w2", [args.w2_clients])
            runner.run("clients", r, 1, args.sweep_workload, clients)
        bare = {w: bare_rss(w, workdir) for w in dict.fromkeys(["w2", args.sweep_workload])}
    finally:
        text, report = render(runner.rows, args, bare)
        print("\n## servekit scaling\n" + text)
        if args.json:
            Path(args.json).write_text(json.dumps(dict(report, settings=vars(args)), indent=1) + "\n")
            print(f"JSON: {args.json}")


if __name__ == "__main__":
    main()
