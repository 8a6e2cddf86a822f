"""servekit next to its peers, in the same run: servekit (`/predictions` and the Open Inference Protocol's
`/v2/models/{m}/infer` JSON), TorchServe 0.12, MLServer 1.7.1 (v2), the KServe 0.21 Python server (v1 `:predict` and
v2), Ray Serve 2.60 and BentoML 1.4.40, on the reference workloads of ../shared/bench (W1 tiny MLP, W2 compute MLP).

    python benchmarks/peers.py --project . [--servers ...] [--cells w1:b8:c64,w1:b8:c1,w2:b8:c64]
                               [--repeats 3] [--duration 8] [--json FILE] [run.py compare options]

Run it through `benchmarks/peers.sh`, which sets up the venvs (`setup_peers.sh all`) and runs this with the
driver venv's Python (torchserve, torch-model-archiver, psutil). Every peer runs from its own venv
(`--peer-venvs`, default $BENCH_PEER_VENVS or /tmp/servekit-peer-venvs/<peer>), with the apps of
../shared/bench/peers (imported, never changed: same weights and model class from models.py, torch.set_num_threads
(1), eager model, batch 8 / 5 ms where the server batches, 1 worker); servekit and TorchServe are started by the
harness exactly as `run.sh` starts them (the same .mar, handler and config.properties).

`--servers` names routes: servekit, servekit-v2, torchserve, mlserver, kserve (v1), kserve-v2, ray, bentoml, and
litserve / floor of the harness. Routes of one server (servekit and servekit-v2, kserve and kserve-v2) are measured
on the same start. Each round, for each (workload, batch) of the cells: the in-process rate with JSON is measured
(`--compare-raw`), then every server in turn (order rotating each round) is started, must answer 200 from its own
socket, gets the correctness check per route (64 distinct inputs x 2, 16 threads, so that batching servers mix
them, compared with the in-process reference outputs), a warm-up per route, one wrk cell per concurrency (quiet
machine wait, noisy-cell retries: the harness's measure_cell), its memory after the last cell, and is stopped by
PID. The JSON has the shape of `run.py compare --json` (cells, ratios to servekit, memory) plus the peers' settings,
versions and semantics notes; `ratios.py` prints it (again: `python benchmarks/ratios.py FILE`).
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import importlib.util
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import ratios  # benchmarks/ratios.py: the one table
from harness import BENCH, REPO, load_harness

HOST = "127.0.0.1"
FLOOR_OUT = [0.25, -0.5, 0.75, 1.0]  # the FastAPI floor's fixed answer (../shared/bench/fastapi_floor.py)
# route name -> (server started, path template, body kind of ../shared/bench/peers/peers_bench.py)
ROUTES: dict[str, tuple[str, str, str]] = {
    "servekit": ("servekit", "/predictions/{w}", "plain"),
    "servekit-v2": ("servekit", "/v2/models/{w}/infer", "v2"),
    "torchserve": ("torchserve", "/predictions/{w}", "plain"),
    "mlserver": ("mlserver", "/v2/models/{w}/infer", "v2"),
    "kserve": ("kserve", "/v1/models/{w}:predict", "v1"),
    "kserve-v2": ("kserve", "/v2/models/{w}/infer", "v2"),
    "ray": ("ray", "/predictions/{w}", "plain"),
    "bentoml": ("bentoml", "/predictions/{w}", "nested"),
    "litserve": ("litserve", "/predictions/{w}", "plain"),
    "floor": ("floor", "/predictions/floor", "plain"),
}
DEFAULT_SERVERS = "servekit,servekit-v2,torchserve,mlserver,kserve,kserve-v2,ray,bentoml"
PEERS = ("mlserver", "kserve", "ray", "bentoml")  # servers with their own venv under --peer-venvs
NO_BATCHING = ("kserve", "floor")  # measured at batch 1 whatever the cell says
DIST = {"mlserver": "mlserver", "kserve": "kserve", "ray": "ray", "bentoml": "bentoml"}
# Where a server's semantics differ from servekit / TorchServe (printed under the table by ratios.py).
NOTES = {
    "servekit": "the same .mar, handler file and config.properties as TorchServe (1 worker, batchSize 8, "
    "maxBatchDelay 5 ms); /predictions answers the plain list",
    "servekit-v2": "same start as servekit /predictions; Open Inference Protocol JSON request, answers the v2 JSON "
    "response (larger than the plain list)",
    "torchserve": "the reference; its per-request access log and metrics files are on (its defaults)",
    "mlserver": "adaptive batching (max_batch_size 8, max_batch_time 5 ms) in the front-end process, the model in "
    "one parallel worker process (parallel_workers=1); debug=false (access log off); its gRPC and metrics "
    "servers run too (they cannot all be switched off); v2 only (NumpyCodec)",
    "kserve": "no in-server batching: every request runs the model alone (batch 1), predict() is synchronous on the "
    "event loop of one uvicorn worker; access log and kserve.trace latency lines on (defaults); v1 answers "
    '{"predictions": [[...]]}',
    "kserve-v2": "same start as KServe v1 (no batching); v2 JSON response",
    "ray": "@serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005) in one replica, max_ongoing_requests=64 "
    "(Ray's default 5 keeps batches under 8); each request goes HTTP proxy actor -> replica actor; its memory "
    "is a whole local Ray cluster (GCS, raylet, proxy, controller, replica, helpers)",
    "bentoml": "batchable API: BentoML's adaptive dispatcher picks the batching window itself (max_batch_size 8, "
    "max_latency_ms 10000; no fixed 5 ms); a request is a batch, so body and answer carry one more level "
    "of brackets",
    "litserve": "max_batch_size 8, batch_timeout 5 ms, 1 worker (the harness's LitServe)",
    "floor": "no model: FastAPI + uvicorn parse the body and return a fixed list (batch 1)",
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def load_peers_bench() -> ModuleType:
    """../shared/bench/peers/peers_bench.py: bodies, answers, the check and the peers' start commands."""
    path = BENCH / "peers" / "peers_bench.py"
    spec = importlib.util.spec_from_file_location("bench_peers", path)
    if spec is None or spec.loader is None or not path.is_file():
        sys.exit(f"ERROR: the peers of the reference harness are not at {path.parent} (set SHARED_BENCH)")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def eff_batch(server: str, batch: int) -> int:
    return 1 if ROUTES[server][0] in NO_BATCHING else batch


def peer_versions(cfg: Any, H: ModuleType, units: list[str]) -> dict[str, str]:
    """'package version (torch version)' of each server started."""
    out: dict[str, str] = {}
    for u in units:
        if u == "servekit":
            out[u] = f"servekit {cfg.servekit_info.get('servekit_version')}"
            continue
        if u in ("torchserve", "litserve"):
            out[u] = f"{u} {H.pkg_version(u)} (torch {H.pkg_version('torch')})"
            continue
        if u == "floor":
            out[u] = f"fastapi {H.pkg_version('fastapi')}, uvicorn {H.pkg_version('uvicorn')}"
            continue
        py = Path(cfg.peers_root) / u / "bin" / "python"
        code = "import importlib.metadata as m, sys; print(m.version(sys.argv[1]), m.version('torch'))"
        r = subprocess.run([str(py), "-c", code, DIST[u]], capture_output=True, text=True, timeout=120)
        v = r.stdout.split()
        out[u] = f"{u} {v[0]} (torch {v[1]})" if len(v) == 2 else f"{u} ? {r.stderr.strip()[-200:]}"
    return out


def start_unit(cfg: Any, H: ModuleType, P: ModuleType, unit: str, w: str, batch: int) -> tuple[Any, int, str, Any]:
    """(Managed, inference port, settings text, describe or None) of one server start."""
    if unit in PEERS:
        c = copy.copy(cfg)
        c.batch = batch
        srv, port, settings = P.make_server(c, H, unit, w)
        return srv, port, settings, None
    srv, _url, info, describe = H.SERVERS[unit](cfg, w, batch)
    return srv, srv.ports[0], info["settings"], describe


def check_route(H: ModuleType, P: ModuleType, route: str, url: str, kind: str, samples: Path) -> dict[str, Any]:
    if route == "floor":
        return dict(H.checkmod.check(url, samples, fixed_output=FLOOR_OUT))
    return dict(P.check(url, kind, samples))


def measure_route(cfg: Any, H: ModuleType, url: str, body: Path, concs: list[int], pid: int) -> list[dict[str, Any]]:
    """The harness's warm-up and cells (wrk + post.lua, quiet wait, noisy retries), as run.py's serve_and_measure."""
    if cfg.warmup > 0:
        H.run_wrk(cfg, url, body, cfg.warmup_concurrency, cfg.warmup)
    cells = []
    for c in concs:
        discarded = []
        for attempt in range(1, cfg.noisy_retries + 2):
            cell = H.measure_cell(cfg, url, body, c, pid)
            other = cell["other_cpu_pct"]
            if other is None or other <= cfg.noisy_max or attempt > cfg.noisy_retries:
                break
            log(f"    c={c}: rps={cell['rps']} but other CPU {other}% > {cfg.noisy_max}%: measuring again")
            discarded.append({"rps": cell["rps"], "other_cpu_pct": other})
        cell.update(attempts=attempt, discarded=discarded, noisy=other is not None and other > cfg.noisy_max)
        log(
            f"    c={c:<3} rps={cell['rps']:<9} p50={cell['p50_ms']}ms p99={cell['p99_ms']}ms err={cell['errors']} "
            f"non2xx={cell['non2xx']} srv={cell['server_cpu_pct']}% wrk={cell['wrk_cpu_pct']}% "
            f"other={cell['other_cpu_pct']}%"
        )
        cells.append(cell)
    return cells


def serve_unit(
    cfg: Any, H: ModuleType, P: ModuleType, unit: str, routes: list[str], w: str, batch: int, concs: list[int], rnd: int
) -> dict[str, list[dict[str, Any]]]:
    """One server start: start, wait for a 200 from its own socket, then per route check, warm up and measure;
    memory after the last cell (on the first route's rows); stop by PID. Rows (or one `failed` row) per route."""
    mdir = Path(cfg.workdir) / "models"
    common = dict(
        H.common_info(cfg, unit, f"{cfg.tag}{rnd}"),
        workload=w,
        batch=batch,
        round=rnd,
        server_version=cfg.versions.get(unit),
    )
    out: dict[str, list[dict[str, Any]]] = {r: [] for r in routes}
    srv = None
    stage = "start"
    try:
        srv, port, settings, describe = start_unit(cfg, H, P, unit, w, batch)
        common["settings"] = settings
        log(f"{unit} {w} batch={batch} round {rnd}: {settings}")
        proc = srv.start()
        pid = proc.pid
        first = next(r for r, v in ROUTES.items() if v[0] == unit)  # the server's own route answers first
        _, path0, kind0 = ROUTES[first]
        try:
            ready = H.wait_ready(
                f"http://{HOST}:{port}{path0.format(w=w)}",
                P.body_file(mdir, w, kind0).read_bytes(),
                proc,
                timeout=cfg.ready_timeout,
            )
        except RuntimeError as e:
            raise RuntimeError(f"{e}; log {srv.log_path}: {srv.log_tail()}") from None
        common["ready_s"] = round(ready, 1)
        if not H.tree_listens(pid, port):
            raise RuntimeError(f"port {port} answers, but not from our server")
        srv.remember()
        log(f"  ready after {common['ready_s']} s")
        stage = "measure"
        if describe:
            common.update(describe())
        for route in routes:
            _, path, kind = ROUTES[route]
            url = f"http://{HOST}:{port}{path.format(w=w)}"
            body = P.body_file(mdir, w, kind)
            chk = check_route(H, P, route, url, kind, mdir / f"{w}_samples.json")
            log(f"  {route} {url}: check {chk}")
            base = dict(common, server=route, route=path, url=url, body_bytes=body.stat().st_size)
            base.update(
                check_ok=chk["ok"], check_n=chk["n"], check_bad=chk["n_bad"], check_max_abs_err=chk["max_abs_err"]
            )
            if chk.get("first_error"):
                base["check_error"] = chk["first_error"]
            out[route] = [dict(base, **cell) for cell in measure_route(cfg, H, url, body, concs, pid)]
            srv.remember()
        mem = dict(H.tree_memory(pid), **H.memory_roles(pid, port))
        log(
            f"  memory: tree RSS/PSS {mem['rss_mib']}/{mem['pss_mib']} MiB ({mem['nprocs']} procs), front end "
            f"{mem['frontend_rss_mib']} MiB, workers {mem['workers_rss_mib']} MiB ({mem['nworkers']})"
        )
        out[routes[0]] = [dict(r, **mem) for r in out[routes[0]]]
        for r in routes[1:]:
            out[r] = [dict(row, same_start_as=routes[0]) for row in out[r]]
    except Exception as e:  # record the failure and go on
        log(f"  FAILED: {type(e).__name__}: {e}")
        fail = dict(common, failed=f"{type(e).__name__}: {e}", failed_stage=stage)
        for r in routes:  # a route not fully measured before the failure fails as a whole
            if stage == "start" or len(out[r]) < len(concs):
                out[r] = [dict(fail, server=r)]
    finally:
        if srv is not None and srv.proc is not None:
            srv.stop()
    for rows in out.values():
        for row in rows:
            H.append_result(cfg, row)
    return out


def add_v2_ratios(cells: dict[str, Any]) -> None:
    """servekit-v2 / each other v2 route, per round (both sides from the same round), as compare_summary does."""
    for e in cells.values():
        mine = {x["round"]: x["rps"] for x in e["servers"].get("servekit-v2", {}).get("runs", []) if x["valid"]}
        if not mine:
            continue
        for s, d in e["servers"].items():
            if s == "servekit-v2" or ROUTES[s][2] != "v2":
                continue
            ref = {x["round"]: x["rps"] for x in d["runs"] if x["valid"]}
            rounds = [r for r in sorted(mine) if ref.get(r)]
            per = [round(mine[r] / ref[r], 3) for r in rounds]
            med = round(statistics.median(per), 3) if per else None
            e["ratios"][f"servekit-v2/{s}"] = {"median": med, "per_round": per, "rounds": rounds}


def run(cfg: Any, H: ModuleType, P: ModuleType) -> int:
    cells = H.parse_cells(cfg.cells)
    servers = cfg.route_list
    units = list(dict.fromkeys(ROUTES[s][0] for s in servers))
    subject = "servekit" if "servekit" in servers else servers[0]
    raw_wl = set(H.csv_list(cfg.compare_raw))
    groups = list(dict.fromkeys((w, b) for w, b, _ in cells))
    meas: dict[tuple[str, str, int, int], dict[int, dict[str, Any]]] = {}
    raw: dict[tuple[str, int], dict[int, float]] = {}
    failures: list[dict[str, Any]] = []
    settings_of: dict[str, dict[str, str]] = {}
    report: dict[str, Any] = {
        "kind": "peers",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "subject": subject,
        "servers": servers,
        "cells_spec": [f"{w}:b{b}:c{c}" for w, b, c in cells],
        "settings": {
            "repeats": cfg.repeats,
            "duration_s": cfg.duration,
            "warmup_s": cfg.warmup,
            "warmup_concurrency": cfg.warmup_concurrency,
            "threads": cfg.threads,
            "format": cfg.format,
            "batch_delay_ms": cfg.batch_delay_ms,
            "noisy_max": cfg.noisy_max,
            "noisy_retries": cfg.noisy_retries,
            "raw_seconds": cfg.compare_raw_seconds,
            "raw_workloads": sorted(raw_wl),
            "peer_venvs": cfg.peers_root,
        },
        "versions": dict(
            cfg.versions, python=platform.python_version(), torch=H.pkg_version("torch"), wrk=H.wrk_version(cfg.wrk)
        ),
        "servekit": getattr(cfg, "servekit_info", None),
        "notes": {s: NOTES[s] for s in servers},
        "same_start": {s: ROUTES[s][0] for s in servers if ROUTES[s][0] != s},
        "results_file": cfg.results,
        "complete": False,
        "error": None,
    }
    t0 = time.time()
    subject_started = False  # a subject that never started ends the run; one that fails later is recorded
    try:
        for r in range(1, cfg.repeats + 1):
            k = (r - 1) % len(units)
            order = units[k:] + units[:k]
            log(f"== peers round {r}/{cfg.repeats}: {', '.join(order)}")
            for w, b in groups:
                if w in raw_wl:
                    if cfg.quiet_timeout > 0:
                        H.wait_quiet(cfg, None)
                    try:
                        raw.setdefault((w, b), {})[r] = H.raw_json_rate(cfg, w, b)
                        log(f"raw+json {w} batch={b} threads={cfg.threads}: {raw[(w, b)][r]:.0f} samples/s")
                    except Exception as e:
                        log(f"  raw FAILED: {e}")
                        failures.append({"server": "raw", "workload": w, "batch": b, "round": r, "error": str(e)})
                for u in order:
                    routes = [s for s in servers if ROUTES[s][0] == u]
                    eb = eff_batch(u, b)
                    concs = list(dict.fromkeys(c for cw, cb, c in cells if cw == w and eff_batch(u, cb) == eb))
                    concs = [c for c in concs if any(r not in meas.get((s, w, eb, c), {}) for s in routes)]
                    if not concs:
                        continue  # a server without batching: measured once per workload
                    rows = serve_unit(cfg, H, P, u, routes, w, eb, concs, r)
                    for route, rr in rows.items():
                        for row in rr:
                            if "settings" in row:
                                settings_of.setdefault(route, {})[f"{w} b{eb}"] = row["settings"]
                            if "failed" not in row:
                                meas.setdefault((route, w, eb, row["concurrency"]), {})[r] = row
                                continue
                            for c in concs:
                                meas.setdefault((route, w, eb, c), {})[r] = row
                            failures.append(
                                {
                                    "server": route,
                                    "workload": w,
                                    "batch": eb,
                                    "round": r,
                                    "stage": row["failed_stage"],
                                    "error": row["failed"],
                                }
                            )
                    if u == ROUTES[subject][0]:
                        fail0 = rows.get(subject, [{}])[0]
                        if fail0.get("failed_stage") != "start":
                            subject_started = True
                        elif not subject_started:  # broken from the start: stop here, as run.py compare does
                            raise H.CompareAbort(f"{subject} could not be started: {fail0['failed']}")
        report["complete"] = True
    except H.CompareAbort as e:
        report["error"] = str(e)
    except BaseException as e:  # interrupted (Ctrl-C, SIGTERM): keep what was measured
        report["error"] = f"interrupted ({type(e).__name__})"
        raise
    finally:
        report["elapsed_s"] = round(time.time() - t0, 1)
        report["failures"] = failures
        report["server_settings"] = settings_of
        report.update(H.compare_summary(cells, servers, subject, eff_batch, meas, raw))
        add_v2_ratios(report["cells"])
        Path(cfg.json).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.json).write_text(json.dumps(report, indent=1) + "\n")
        print()
        print(ratios.table(report))
        print(f"\nJSON: {cfg.json} (python benchmarks/ratios.py {cfg.json} prints the table again)")
    if report["error"]:
        return 3
    return 1 if failures else 0


def parse(argv: list[str] | None, H: ModuleType) -> Any:
    ap = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Other options (--warmup, --threads, --noisy-max, --ready-timeout, --servekit-venv, ...) go to the "
        "harness's run.py compare (python ../shared/bench/run.py --help).",
    )
    ap.add_argument(
        "--servers",
        default=os.environ.get("BENCH_SERVERS") or DEFAULT_SERVERS,
        help=f"routes to measure, out of {', '.join(ROUTES)} (default {DEFAULT_SERVERS}; env BENCH_SERVERS)",
    )
    ap.add_argument(
        "--cells",
        default=os.environ.get("BENCH_CELLS") or "w1:b8:c64,w1:b8:c1,w2:b8:c64",
        help="WORKLOAD:bBATCH:cCLIENTS list (env BENCH_CELLS)",
    )
    ap.add_argument("--repeats", type=int, default=3, help="rounds (servers alternating)")
    ap.add_argument("--duration", type=int, default=8, help="seconds per cell")
    ap.add_argument("--compare-raw", default="w1,w2", help="workloads with the in-process raw+json rate")
    ap.add_argument(
        "--peer-venvs",
        default=os.environ.get("BENCH_PEER_VENVS", "/tmp/servekit-peer-venvs"),
        help="one venv per peer: DIR/{mlserver,kserve,ray,bentoml} (benchmarks/setup_peers.sh all)",
    )
    ap.add_argument("--project", default=str(REPO), help="the servekit checkout (default this one)")
    ap.add_argument("--json", default=None, help="default $BENCH_WORKDIR/peers.json")
    ap.add_argument("--tag", default="peers", help="tag prefix of the rows in the results file")
    args, rest = ap.parse_known_args(argv)
    passthrough = ["--cells", args.cells, "--repeats", str(args.repeats), "--duration", str(args.duration)]
    passthrough += ["--compare-raw", args.compare_raw, "--project", args.project, "--tag", args.tag]
    cfg = H.parse_args(["compare", *passthrough, *rest])
    cfg.route_list = [s.strip() for s in args.servers.split(",") if s.strip()]
    bad = [s for s in cfg.route_list if s not in ROUTES]
    if bad or not cfg.route_list or len(set(cfg.route_list)) != len(cfg.route_list):
        sys.exit(f"ERROR: --servers {args.servers!r}: distinct names out of {', '.join(ROUTES)}")
    H.parse_cells(cfg.cells)
    cfg.peers_root = str(Path(args.peer_venvs).resolve())
    cfg.bench_dir = str(BENCH)
    cfg.json = args.json or str(Path(cfg.workdir) / "peers.json")
    return cfg


def main(argv: list[str] | None = None) -> int:
    H = load_harness()
    P = load_peers_bench()
    cfg = parse(argv, H)
    signal.signal(signal.SIGTERM, H._terminate)  # SystemExit: the servers started are stopped
    signal.signal(signal.SIGHUP, H._terminate)
    if not shutil.which(cfg.wrk):
        sys.exit(f"ERROR: wrk not found ({cfg.wrk}); apt-get install wrk or set BENCH_WRK")
    units = list(dict.fromkeys(ROUTES[s][0] for s in cfg.route_list))
    missing = [u for u in units if u in PEERS and not (Path(cfg.peers_root) / u / "bin" / "python").exists()]
    if missing:
        sys.exit(
            f"ERROR: no venv for {', '.join(missing)} under {cfg.peers_root}: run benchmarks/setup_peers.sh all "
            f"(or name those peers)"
        )
    need = ["torch-model-archiver"] if {"torchserve", "servekit"} & set(units) else []
    need += ["torchserve"] if "torchserve" in units else []
    gone = [n for n in need if not (Path(sys.executable).parent / n).exists()]
    if gone:
        sys.exit(
            f"ERROR: {', '.join(gone)} not beside {sys.executable}: run this with the driver venv's Python "
            f"(benchmarks/setup_peers.sh prints it)"
        )
    if "servekit" in units:
        H.setup_servekit(cfg)  # the harness's servekit venv (editable install of --project)
    mdir = Path(cfg.workdir) / "models"
    if not (mdir / "w1_samples.json").exists():
        H.cmd_prepare(cfg)
    P.write_bodies(mdir)
    cfg.versions = peer_versions(cfg, H, units)
    log(f"peers: {json.dumps(cfg.versions)}; results {cfg.results}")
    return run(cfg, H, P)


if __name__ == "__main__":
    sys.exit(main())
