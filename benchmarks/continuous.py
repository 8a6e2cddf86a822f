"""Continuous batching against static batching on a generative model (issue 17, item 3), in the same run.

    python benchmarks/continuous.py                       # 16 and 64 streams, 2 rounds x 20 s per cell (~4 min)
    python benchmarks/continuous.py --streams 64 --rounds 1 --seconds 10              # a quick look
    python benchmarks/continuous.py --static shrink       # against a static batch that drops finished rows
    python benchmarks/continuous.py --think-ms 20         # streams pause between requests (arrivals not in step)
    python benchmarks/continuous.py --client python       # the streams from this process's asyncio client, not C

One servekit (this checkout) serves the tiny transformer of ``examples/generative`` twice, with the same handler file
and settings (1 worker, ``batchSize`` ``--batch-size``, 64 by default): ``continuous`` with ``continuousBatching:
true`` (each call is one iteration; requests join and leave the running batch) and ``static`` without it (each call
runs its batch to the end, streaming every step with ``send_intermediate_predict_response``: today's static
streaming, where a batch waits for its longest request and new requests wait for the batch). The static batch keeps
its finished rows to its end, as ``model.generate`` does, or with ``--static shrink`` drops them (the handler's
``static: shrink``). Each of ``--streams`` clients keeps one request in flight over a keep-alive connection, reading
the chunked answer token by token, and sends its next request as soon as the last one ends (a closed loop; with
``--think-ms``, after an exponential pause of that mean). Requests are drawn from one seeded list, the same for both
models: prompts of 4-32 bytes, and 3 in 4 asking for 4-32 tokens, 1 in 4 for 128-192 (mixed lengths, a long tail).

Measured after ``--warmup`` seconds, for ``--seconds``: tokens per second (tokens received in the window), and per
CPU second of the workers (which other processes on a shared machine disturb less); time to first token (TTFT:
sending to the first chunk, of the requests sent in the window; median and p90, and the front end's mean from
arrival to first chunk, ``servekit_request_latency_seconds``); the median gap between two tokens of one stream, which
is one iteration of the worker, and TTFT in those iterations; from the server's metrics, requests per handler call
(the iteration's batch, or the static batch) and the worker's busy fraction; the cores used by the front end, the
workers and the client (from /proc; the C client's from its getrusage). Models alternate within a round, and the
order alternates between rounds; the table has the medians over rounds. Below it, for each count of streams, the
ratio of tokens per second of each round's pair (continuous over static, measured one after the other), with the
sizes of static batching's batches in that round (``servekit_batch_size``, by bucket): the machine's speed moves less
within a pair than between rounds, and static batching's own tokens per second moves with the cohorts its closed loop
falls into. A batch leaves as soon as the worker is free (servekit never waits out ``maxBatchDelay``), so the streams
split into two cohorts that alternate, set by how their first requests fell into batches; a cohort of ~60 with one
of a few is static batching's fastest split here (a batch of a few often holds no long request and ends early);
with more in the smaller cohort, both batches run as long as a long request, whatever the split. So read the spread
of these ratios and the splits beside them, not one number.

The client (``--client``) is ``benchmarks/streamclient.c`` by default, compiled with ``cc`` into ``$BENCH_WORKDIR``
on first use: one C process, one thread and epoll, that runs the streams as described and prints what it measured
(tokens, requests, errors, each TTFT and each gap) for this script's table. ``--client python`` (the default where
there is no ``cc``) runs the same streams as a small asyncio HTTP/1.1 reader in this process (one Python thread, on
uvloop when it is installed, as the server is): it measures the same tokens per second and iteration, but on two
cores its own event loop added 0.5 ms or so (0.1-0.2 of an iteration, 1 ms and more when the machine is busy) to each
time to first token, and it used ~0.2 core, the C client ~0.1. Either runs on the same machine as the server: on a
shared machine, compare the ratios of one run, not absolute numbers across runs. Results go to
``$BENCH_WORKDIR/continuous.json`` (default ``/tmp/servekit-bench``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "generative"
PORT = 18600
run: Callable[..., Any] = asyncio.run
with contextlib.suppress(ImportError):  # the client's own loop: uvloop, as the server's, when installed
    import uvloop

    run = uvloop.run
MODES = ("static", "continuous")


def jobs(count: int, seed: int = 17) -> list[bytes]:
    """The request bodies, in the order the streams take them."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz "
    bodies = []
    for _ in range(count):
        prompt = "".join(rng.choice(letters) for _ in range(rng.randint(4, 32)))
        tokens = rng.randint(128, 192) if rng.random() < 0.25 else rng.randint(4, 32)
        bodies.append(json.dumps({"prompt": prompt, "max_new_tokens": tokens}).encode())
    return bodies


def prepare(work: Path, batch_size: int, static: str) -> Path:
    """Both archives, from the example's files, differing only in ``continuousBatching``."""
    sys.path.insert(0, str(REPO))
    from servekit import archiver

    store = work / "store"
    store.mkdir(parents=True, exist_ok=True)
    for mode in MODES:
        config = work / f"{mode}.yaml"
        settings = [f"minWorkers: 1\nmaxWorkers: 1\nbatchSize: {batch_size}\nmaxBatchDelay: 5\nresponseTimeout: 120\n"]
        settings += [f"handler:\n  seed: 0\n  static: {static}\n"]
        settings += [f"continuousBatching: {'true' if mode == 'continuous' else 'false'}\n"]
        config.write_text("".join(settings))
        args = ["--model-name", mode, "--version", "1.0", "--handler", str(EXAMPLE / "handler.py"), "--force"]
        args += ["--extra-files", str(EXAMPLE / "decoder.py"), "--config-file", str(config)]
        assert archiver.main([*args, "--export-path", str(store)]) == 0
    return store


def start(work: Path, store: Path) -> subprocess.Popen[bytes]:
    run = work / "run"
    run.mkdir(exist_ok=True)
    lines = [f"inference_address=http://127.0.0.1:{PORT}", f"management_address=http://127.0.0.1:{PORT + 1}"]
    lines += [f"metrics_address=http://127.0.0.1:{PORT + 2}", "enable_grpc=false", "job_queue_size=1024"]
    (run / "config.properties").write_text("\n".join(lines) + "\n")
    command = [sys.executable, "-m", "servekit", "start", "--foreground", "--ncs", "--disable-token-auth"]
    command += ["--model-store", str(store), "--models", *(f"{m}={m}.mar" for m in MODES)]
    command += ["--ts-config", str(run / "config.properties")]
    env = {**os.environ, "TMPDIR": str(run), "PYTHONPATH": str(REPO)}
    with open(run / "server.log", "wb") as log:
        process = subprocess.Popen(command, cwd=run, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit(f"servekit exited: see {run / 'server.log'}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{PORT}/ping", timeout=2) as answer:
                if answer.status == 200:
                    return process
        except OSError:
            pass
        time.sleep(0.2)
    stop(process)
    sys.exit("servekit did not become healthy")


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@dataclass
class Stats:
    tokens: int = 0  # received in the window
    ttft: list[float] = field(default_factory=list)  # seconds, of requests sent in the window
    gaps: list[float] = field(default_factory=list)  # seconds between two tokens of one stream, in the window
    requests: int = 0  # answered, sent in the window
    errors: int = 0
    cpu: tuple[float, ...] = (0.0, 0.0, 0.0)  # cores used in the window: front end, workers, this client
    calls: tuple[float, ...] = (0.0,) * 5  # in the window: see ``handler_calls``
    batches: dict[float, float] = field(default_factory=dict)  # in the window: handler calls by batch size bucket


async def stream(
    model: str, bodies: list[bytes], start: float, end: float, stats: Stats, pause: Callable[[], float] | None = None
) -> None:
    """One client: requests one after the other on a keep-alive connection until ``end`` (with ``pause``, that many
    seconds before each)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", PORT)
    head = f"POST /predictions/{model} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
    try:
        for body in bodies:
            if pause is not None:
                await asyncio.sleep(pause())
            sent = time.perf_counter()
            if sent >= end:
                return
            writer.write(f"{head}content-length: {len(body)}\r\n\r\n".encode() + body)
            status = int((await reader.readline()).split()[1])
            chunked, length = False, 0
            while (line := await reader.readline()) != b"\r\n":
                chunked |= line.lower().startswith(b"transfer-encoding: chunked")
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            if not chunked:  # an error (the benchmark's requests all stream): counted, as the C client counts it
                await reader.readexactly(length)
                stats.errors += 1
                continue
            last = None
            while size := int((await reader.readline()).strip(), 16):
                data = await reader.readexactly(size + 2)
                now = time.perf_counter()
                count = data.count(b"\n", 0, size)  # tokens end in a newline; the chunk in CRLF
                if start <= now < end:
                    stats.tokens += count
                    if last is not None and count:
                        stats.gaps.append(now - last)
                if last is None and start <= sent < end:
                    stats.ttft.append(now - sent)
                last = now if count else last
            await reader.readline()
            if status != 200:
                stats.errors += 1
            elif start <= sent < end:
                stats.requests += 1
    finally:
        writer.close()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu(server: int) -> tuple[float, float, float]:
    """CPU seconds so far of the front end, of its children (the workers and the zygote) and of this process."""
    children = [int(c) for c in Path(f"/proc/{server}/task/{server}/children").read_text().split()]
    return cpu_seconds(server), sum(cpu_seconds(c) for c in children), time.process_time()


def handler_calls(model: str) -> tuple[tuple[float, float, float, float, float], dict[float, float]]:
    """The server's counts so far for ``model``: handler calls, their seconds, the requests in them, and the requests
    answered and their seconds from arrival to the first chunk (the front end's view of the time to first token);
    and its handler calls by the bucket of their batch size (``servekit_batch_size``, by upper bound, not
    cumulative)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{PORT + 2}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    values, cumulative = {}, {}
    for line in text.splitlines():
        name, _, value = line.rpartition(" ")
        if f'model_name="{model}"' not in name:
            continue
        if name.startswith("servekit_batch_size_bucket"):
            cumulative[float(name.split('le="', 1)[1].split('"', 1)[0])] = float(value)
        values[name.split("{")[0]] = float(value)
    buckets, below = {}, 0.0
    for bound in sorted(cumulative):
        buckets[bound], below = cumulative[bound] - below, cumulative[bound]
    calls = (
        values["servekit_handler_time_seconds_count"],
        values["servekit_handler_time_seconds_sum"],
        values["servekit_batch_size_sum"],
        values["servekit_request_latency_seconds_count"],
        values["servekit_request_latency_seconds_sum"],
    )
    return calls, buckets


async def measure(model: str, warmup: float, seconds: float, server: int, stats: Stats) -> None:
    """The window's cores (``cpu``) and handler calls, from ``warmup`` s on for ``seconds``."""
    await asyncio.sleep(warmup)
    before, (calls, batches) = cpu(server), await asyncio.to_thread(handler_calls, model)
    await asyncio.sleep(seconds)
    stats.cpu = tuple((after - b) / seconds for after, b in zip(cpu(server), before, strict=True))
    after, batches_after = await asyncio.to_thread(handler_calls, model)
    stats.calls = tuple(a - b for a, b in zip(after, calls, strict=True))
    stats.batches = {bound: n - batches.get(bound, 0.0) for bound, n in batches_after.items()}


async def load(
    model: str, streams: int, warmup: float, seconds: float, bodies: list[bytes], server: int, think_ms: float
) -> Stats:
    """The Python client: ``streams`` coroutines of this process."""
    stats = Stats()
    start = time.perf_counter() + warmup
    end = start + seconds
    pauses = [
        functools.partial(random.Random(i).expovariate, 1000 / think_ms) if think_ms else None for i in range(streams)
    ]
    clients = [stream(model, bodies[i::streams], start, end, stats, pauses[i]) for i in range(streams)]
    await asyncio.gather(measure(model, warmup, seconds, server, stats), *clients)
    return stats


DRAIN = 30.0  # seconds the C client waits for the answers still in flight at the end of the window


def streamclient(work: Path) -> Path:
    """benchmarks/streamclient.c, compiled into ``work`` when it is missing or older than its source."""
    binary = work / "streamclient"
    source = Path(__file__).with_name("streamclient.c")
    if not binary.exists() or binary.stat().st_mtime < source.stat().st_mtime:
        subprocess.run(["cc", "-O2", "-Wall", "-Wextra", "-o", str(binary), str(source), "-lm"], check=True)
    return binary


async def load_c(
    binary: Path, model: str, streams: int, warmup: float, seconds: float, bodies: Path, server: int, think_ms: float
) -> Stats:
    """The C client (benchmarks/streamclient.c) in a process of its own: the same streams, window and records as
    ``load``'s."""
    stats = Stats()
    args = ["127.0.0.1", str(PORT), model, str(bodies), str(streams), str(warmup), str(seconds), str(think_ms), "0"]
    pipe = asyncio.subprocess.PIPE
    process = await asyncio.create_subprocess_exec(str(binary), *args, str(DRAIN), stdout=pipe, stderr=pipe)
    try:  # the client ends DRAIN s after the window at the latest, whatever the server does; this in case it does not
        _, (out, err) = await asyncio.wait_for(
            asyncio.gather(measure(model, warmup, seconds, server, stats), process.communicate()),
            warmup + seconds + DRAIN + 30,
        )
    except TimeoutError:
        raise RuntimeError(f"streamclient did not end within {warmup + seconds + DRAIN + 30:g} s: killed") from None
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    if process.returncode:
        raise RuntimeError(f"streamclient exited {process.returncode}: {err.decode(errors='replace')}")
    result = json.loads(out)
    stats.tokens, stats.requests, stats.errors = result["tokens"], result["requests"], result["errors"]
    stats.ttft, stats.gaps = result["ttft"], result["gaps"]
    stats.cpu = (*stats.cpu[:2], result["cpu_window_s"] / seconds)  # its CPU, not this process's
    if stats.errors:
        print(f"streamclient: errors {result['errors_by_kind']}", file=sys.stderr, flush=True)
    return stats


def summary(stats: Stats, seconds: float) -> dict[str, float]:
    ttft = sorted(stats.ttft)
    iteration = statistics.median(stats.gaps) if stats.gaps else float("nan")
    median_ttft = statistics.median(ttft) if ttft else float("nan")
    return {
        "tokens_per_s": stats.tokens / seconds,
        "tokens_per_worker_cpu_s": stats.tokens / seconds / max(1e-9, stats.cpu[1]),
        "requests_per_s": stats.requests / seconds,
        "ttft_p50_ms": median_ttft * 1000,
        "ttft_p90_ms": ttft[int(len(ttft) * 0.9)] * 1000 if ttft else float("nan"),
        "server_ttft_mean_ms": stats.calls[4] / max(1.0, stats.calls[3]) * 1000,
        "iteration_ms": iteration * 1000,
        "ttft_p50_iterations": median_ttft / iteration,
        "errors": stats.errors,
        "handler_ms_per_call": stats.calls[1] / max(1.0, stats.calls[0]) * 1000,
        "requests_per_call": stats.calls[2] / max(1.0, stats.calls[0]),
        "handler_busy": stats.calls[1] / seconds,
        "cpu_front_end": stats.cpu[0],
        "cpu_workers": stats.cpu[1],
        "cpu_client": stats.cpu[2],
        "batch_sizes": batch_sizes(stats.batches),
    }


def batch_sizes(buckets: dict[float, float]) -> str:
    """Handler calls by batch size, the largest first: ``"33-64 x15, 17-32 x15"``."""
    cells, low = [], 1
    for bound in sorted(b for b in buckets if b != float("inf")):  # a batch is at most batchSize: never over
        high = int(bound)
        if buckets[bound]:
            cells.append(f"{low}-{high} x{buckets[bound]:.0f}" if low < high else f"{low} x{buckets[bound]:.0f}")
        low = high + 1
    return ", ".join(reversed(cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", default="16,64", help="concurrent streams, comma-separated")
    parser.add_argument("--seconds", type=float, default=20.0, help="measured seconds per cell")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds before measuring")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64, help="the models' batchSize")
    parser.add_argument(
        "--think-ms",
        type=float,
        default=0.0,
        help="mean pause of a stream before each request (exponential; default none: a closed loop whose requests "
        "come just after an iteration began)",
    )
    parser.add_argument(
        "--static",
        choices=("fixed", "shrink"),
        default="fixed",
        help="static batching's rows: all kept to the end of the batch, as model.generate does (fixed), or taken out "
        "as their requests finish (shrink)",
    )
    parser.add_argument(
        "--client",
        choices=("c", "python"),
        default="c" if shutil.which("cc") else "python",
        help="the streams' client: benchmarks/streamclient.c, compiled with cc (the default when there is a cc), or "
        "this process's asyncio client, whose own loop adds ~1 ms to each time to first token",
    )
    args = parser.parse_args()
    work = Path(os.environ.get("BENCH_WORKDIR", "/tmp/servekit-bench")) / "continuous"
    work.mkdir(parents=True, exist_ok=True)
    bodies = jobs(20000)
    binary = streamclient(work.parent) if args.client == "c" else None
    lines = work / "bodies.jsonl"  # for the C client: one body a line
    lines.write_bytes(b"".join(body + b"\n" for body in bodies))
    process = start(work, prepare(work, args.batch_size, args.static))
    counts = [int(s) for s in args.streams.split(",")]
    results: list[dict[str, Any]] = []
    try:
        for streams in counts:
            for round_ in range(args.rounds):
                for mode in MODES if round_ % 2 == 0 else MODES[::-1]:
                    if binary is None:
                        stats = run(load(mode, streams, args.warmup, args.seconds, bodies, process.pid, args.think_ms))
                    else:
                        window = (streams, args.warmup, args.seconds)
                        stats = run(load_c(binary, mode, *window, lines, process.pid, args.think_ms))
                    row = {"streams": streams, "round": round_, "mode": mode, **summary(stats, args.seconds)}
                    results.append(row)
                    print(json.dumps(row), flush=True)
    finally:
        stop(process)
    (work.parent / "continuous.json").write_text(json.dumps(results, indent=1))
    think = f", think {args.think_ms:g} ms" if args.think_ms else ""
    setting = f"batchSize {args.batch_size}, static {args.static}{think}, client {args.client}"
    print(f"\n{setting}, {args.rounds} x {args.seconds:g} s; medians:")
    print(TABLE)
    paired = []  # a line per count of streams, under the table
    for streams in counts:
        rows = {mode: [r for r in results if r["streams"] == streams and r["mode"] == mode] for mode in MODES}
        numbers = [key for key in rows["static"][0] if key not in ("mode", "batch_sizes")]
        medians = {m: {key: statistics.median(float(r[key]) for r in rows[m]) for key in numbers} for m in MODES}
        for mode in MODES:
            m = medians[mode]
            ratio = m["tokens_per_s"] / medians["static"]["tokens_per_s"]
            per_cpu = m["tokens_per_worker_cpu_s"] / medians["static"]["tokens_per_worker_cpu_s"]
            cores = f"{m['cpu_front_end']:.2f} / {m['cpu_workers']:.2f} / {m['cpu_client']:.2f}"
            print(
                f"| {streams} | {mode} | {m['tokens_per_s']:.0f} | {ratio:.2f} | {m['tokens_per_worker_cpu_s']:.0f} | "
                f"{per_cpu:.2f} | {m['ttft_p50_ms']:.1f} | "
                f"{m['ttft_p90_ms']:.1f} | {m['server_ttft_mean_ms']:.1f} | {m['iteration_ms']:.2f} | "
                f"{m['ttft_p50_iterations']:.2f} | "
                f"{m['requests_per_call']:.1f} | {m['handler_busy']:.2f} | {cores} |"
            )
        static = {r["round"]: r for r in rows["static"]}
        ratios = [(r["tokens_per_s"] / static[r["round"]]["tokens_per_s"], r["round"]) for r in rows["continuous"]]
        rounds = "; ".join(f"{x:.2f} (static batches {static[i]['batch_sizes']})" for x, i in sorted(ratios))
        paired.append(
            f"{streams} streams, continuous over static tokens/s in each round: {rounds}; median "
            f"{statistics.median(x for x, _ in ratios):.2f}"
        )
    print("\n".join(paired))


TABLE = (
    "| streams | mode | tokens/s | x static | tokens per worker CPU s | x static | TTFT p50 ms | TTFT p90 ms "
    "| front end TTFT mean ms | iteration ms | TTFT p50 in iterations | requests per handler call | worker busy "
    "| cores: front end / workers / client |\n" + "| --- " * 14 + "|"
)


if __name__ == "__main__":
    main()
