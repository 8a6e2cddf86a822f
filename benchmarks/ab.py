"""A/B for a hot-path change: two (or more) copies of ``servekit/`` on the same workload, alternating, with the CPU
time each process spent per answered request.

    git archive HEAD servekit | tar -x -C /tmp/before          # the build to compare against
    python benchmarks/ab.py before=/tmp/before after=.          # DIR holds a servekit/ folder
    python benchmarks/ab.py a=. b=.+access_log=false            # "+key=value": extra config.properties lines
    python benchmarks/ab.py http=. https=.+tls --clients 64     # "+tls": the inference port over HTTPS
    python benchmarks/ab.py --workload w2 --clients 64 --rounds 3 --seconds 8 --floor a=/tmp/before b=.

Each build is started like ``run.py servekit`` starts it (the reference ``.mar`` with the TorchServe handler of
``../shared/bench``, 1 worker, batch 8, delay 5 ms, no token auth), warmed up, and loaded with ``wrk`` (its
``post.lua``) at each client count; ``--floor`` adds the bare FastAPI endpoint. Printed per run and as medians:
req/s, p50, p99, and the CPU seconds per request of the front end and of the workers, read from /proc around each
wrk run. On a shared machine the CPU per request moves much less than req/s does. Loopback only; every server is
started and stopped here by PID. A build marked ``+tls`` serves its inference port over HTTPS (``https://``, a
self-signed RSA 2048 certificate made with the ``openssl`` command, the key and certificate as PEM files); ``wrk``
keeps its connections open, so this measures the cost of TLS per request, not per handshake.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import ssl
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BENCH = Path(os.environ.get("SHARED_BENCH", REPO.parent / "shared" / "bench"))
PORT = 18500


def prepare(work: Path, workload: str) -> Path:
    """The workload's models, bodies and ``.mar`` (built once with the reference archiver arguments)."""
    store = work / "store"
    if not (store / f"{workload}.mar").exists():
        env = {**os.environ, "BENCH_WORKDIR": str(work)}
        subprocess.run([sys.executable, BENCH / "run.py", "prepare"], check=True, env=env, capture_output=True)
        models = work / "models"
        archiver = Path(sys.executable).parent / "torch-model-archiver"
        extra = f"{models / (workload + '_state.pt')},{BENCH / 'models.py'}"
        command = [archiver, "--model-name", workload, "--version", "1.0", "--serialized-file"]
        command += [models / f"{workload}.pt", "--extra-files", extra, "--handler", BENCH / "ts_handler.py"]
        store.mkdir(parents=True, exist_ok=True)
        subprocess.run([*command, "--export-path", store, "--force"], check=True, capture_output=True)
    return store


def start(name: str, spec: str | None, work: Path, workload: str) -> tuple[subprocess.Popen[bytes], str]:
    run = work / f"run-{name}"
    run.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "TMPDIR": str(run), "OMP_NUM_THREADS": "1"}
    if spec is None:
        command = [sys.executable, str(BENCH / "fastapi_floor.py"), "--port", str(PORT)]
        url = f"http://127.0.0.1:{PORT}/predictions/floor"
    else:
        source, *extra = spec.split("+")
        scheme = "https" if "tls" in extra else "http"
        extra = [line for line in extra if line != "tls"]
        if scheme == "https":
            extra += [f"{key}={path}" for key, path in certificate(work).items()]
        env["PYTHONPATH"] = str(Path(source).resolve())
        entry = {"defaultVersion": True, "marName": f"{workload}.mar", "minWorkers": 1, "maxWorkers": 1}
        entry |= {"batchSize": 8, "maxBatchDelay": 5, "responseTimeout": 120}
        lines = [f"inference_address={scheme}://127.0.0.1:{PORT}", f"management_address=http://127.0.0.1:{PORT + 1}"]
        lines += [f"metrics_address=http://127.0.0.1:{PORT + 2}", f"model_store={work / 'store'}"]
        lines += ["models=" + json.dumps({workload: {"1.0": entry}}), *extra]
        (run / "config.properties").write_text("\n".join(lines) + "\n")
        command = [sys.executable, "-m", "servekit", "start", "--foreground", "--ncs", "--disable-token-auth"]
        command += ["--model-store", str(work / "store"), "--models", f"{workload}={workload}.mar"]
        command += ["--ts-config", str(run / "config.properties")]
        url = f"{scheme}://127.0.0.1:{PORT}/predictions/{workload}"
    with open(run / "server.log", "wb") as log:
        process = subprocess.Popen(command, cwd=run, env=env, stdout=log, stderr=subprocess.STDOUT)
    body = (work / "models" / f"{workload}_body.json").read_bytes()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        request = urllib.request.Request(url, body, {"content-type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=2, context=UNVERIFIED) as response:
                response.read()
            return process, url
        except OSError:
            time.sleep(0.1)
    process.kill()
    raise SystemExit(f"{name} did not answer within 120 s: see {run / 'server.log'}")


UNVERIFIED = ssl.create_default_context()  # the self-signed certificate of a +tls build
UNVERIFIED.check_hostname = False
UNVERIFIED.verify_mode = ssl.CERT_NONE


def certificate(work: Path) -> dict[str, Path]:
    """A self-signed key and certificate for 127.0.0.1 (made once), as ``config.properties`` keys."""
    key, cert = work / "tls-key.pem", work / "tls-cert.pem"
    if not cert.exists():
        command = ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "30", "-subj", "/CN=127.0.0.1"]
        command += ["-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)]
        subprocess.run(command, check=True, capture_output=True)
    return {"private_key_file": key, "certificate_file": cert}


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_tree(pid: int) -> list[int]:
    children = [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    return [pid, *children]


def load(url: str, body: Path, clients: int, seconds: int, pid: int) -> dict[str, float]:
    pids = process_tree(pid)
    before = [cpu_seconds(p) for p in pids]
    command = ["wrk", "-t1", f"-c{clients}", f"-d{seconds}s", "--latency", "-s", str(BENCH / "post.lua"), url]
    output = subprocess.run([*command, "--", str(body)], capture_output=True, text=True, check=True).stdout
    summary = json.loads(next(line for line in output.splitlines() if line.startswith("WRK_JSON "))[9:])
    requests = max(1, summary["requests"])
    spent = [(cpu_seconds(p) - b) / requests * 1e6 for p, b in zip(pids, before, strict=True)]
    return {
        "rps": summary["requests"] / (summary["duration_us"] / 1e6),
        "p50_ms": summary["p50_us"] / 1000,
        "p99_ms": summary["p99_us"] / 1000,
        "front_us": spent[0],
        "workers_us": sum(spent[1:]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("builds", nargs="+", help="NAME=DIR[+key=value...]: DIR holds the servekit/ folder to run")
    parser.add_argument("--workload", default="w1", choices=["w1", "w2"])
    parser.add_argument("--clients", default="64,1", help="comma-separated wrk connection counts")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--floor", action="store_true", help="also measure the bare FastAPI endpoint")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/servekit-ab"))
    args = parser.parse_args()
    builds: dict[str, str | None] = dict(b.split("=", 1) for b in args.builds)
    if args.floor:
        builds["floor"] = None
    prepare(args.workdir, args.workload)
    body = args.workdir / "models" / f"{args.workload}_body.json"
    results: dict[tuple[str, int], list[dict[str, float]]] = {}
    for round_ in range(args.rounds):
        for name, spec in builds.items():
            process, url = start(name, spec, args.workdir, args.workload)
            try:
                load(url, body, 8, 2, process.pid)  # warm-up
                for clients in (int(c) for c in args.clients.split(",")):
                    row = load(url, body, clients, args.seconds, process.pid)
                    results.setdefault((name, clients), []).append(row)
                    print(f"round {round_} {name:>10} c={clients:<3} " + format_row(row), flush=True)
            finally:
                process.send_signal(signal.SIGTERM)
                process.wait(60)
    print(f"medians over {args.rounds} round(s), {args.workload}, {args.seconds} s per cell:")
    for (name, clients), rows in results.items():
        median = {key: statistics.median(r[key] for r in rows) for key in rows[0]}
        print(f"{name:>10} c={clients:<3} " + format_row(median))


def format_row(row: dict[str, float]) -> str:
    return (
        f"{row['rps']:8.0f} req/s  p50 {row['p50_ms']:6.2f} ms  p99 {row['p99_ms']:7.2f} ms  "
        f"CPU/req front {row['front_us']:5.0f} us, workers {row['workers_us']:5.0f} us"
    )


if __name__ == "__main__":
    main()
