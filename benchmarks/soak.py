"""Soak and overload run against a real servekit on loopback (bounded in time, stops by itself).

    python benchmarks/soak.py                      # capacity, 10 min at 70 %, 60 s at 200 %, recovery
    python benchmarks/soak.py --minutes 1 --overload-seconds 10   # a quick look

It starts ``servekit start --foreground`` on the bundled example model (``model_store/mlp``, batch size 8) on free
ports, measures its capacity with a closed loop of 32 connections, then sends an open-loop stream (requests
scheduled at a fixed rate; latency counted from the scheduled time, so a stalled server cannot hide) at 70 % of
capacity for ``--minutes``, printing per minute: requests sent and answered, errors, p50/p99, front-end and worker
RSS, and the front end's open file descriptors. Then 200 % of capacity for ``--overload-seconds``: how many
requests were shed with 503, and how long after the overload ends latency is back to its soak level.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BODY = json.dumps({"data": [float(i) / 16 for i in range(16)]}).encode()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Window:
    sent: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)

    def line(self) -> str:
        lat = sorted(self.latencies) or [float("nan")]
        p50, p99 = lat[len(lat) // 2], lat[min(len(lat) - 1, int(len(lat) * 0.99))]
        answered = sum(self.statuses.values())
        errors = {code: n for code, n in self.statuses.items() if code != 200}
        return f"sent={self.sent} answered={answered} errors={errors} p50={p50 * 1000:.2f}ms p99={p99 * 1000:.2f}ms"


class Client:
    """Up to ``connections`` keep-alive HTTP/1.1 connections to one URL path, one request at a time on each; a
    request waits for a free connection (that wait counts in its latency)."""

    def __init__(self, port: int, path: str, connections: int) -> None:
        self.port = port
        self.head = (
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(BODY)}\r\n\r\n"
        ).encode()
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self.slots = asyncio.Semaphore(connections)
        self.failures: Counter[str] = Counter()

    async def post(self) -> int:
        async with self.slots:
            return await self._post()

    async def _post(self) -> int:
        if self.idle:  # a keep-alive connection the server may have closed while idle: retry once on a new one
            status = await self._exchange(self.idle.pop(), count_failure=False)
            if status:
                return status
        try:
            conn = await asyncio.open_connection("127.0.0.1", self.port)
        except OSError as exc:
            self.failures[type(exc).__name__] += 1
            return 0
        return await self._exchange(conn, count_failure=True)

    async def _exchange(self, conn: tuple[asyncio.StreamReader, asyncio.StreamWriter], count_failure: bool) -> int:
        reader, writer = conn
        try:
            writer.write(self.head + BODY)
            status = int((await reader.readline()).split()[1])
            length, close = 0, False
            while (line := await reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.decode().partition(":")
                if name.lower() == "content-length":
                    length = int(value)
                close |= name.lower() == "connection" and "close" in value.lower()
            await reader.readexactly(length)
        except (OSError, ValueError, IndexError, asyncio.IncompleteReadError) as exc:
            if count_failure:
                self.failures[type(exc).__name__] += 1
            writer.close()
            return 0
        if close:
            writer.close()
        else:
            self.idle.append(conn)
        return status


async def closed_loop(client: Client, seconds: float, connections: int) -> float:
    done = 0
    end = time.monotonic() + seconds

    async def loop() -> None:
        nonlocal done
        while time.monotonic() < end:
            if await client.post() == 200:
                done += 1

    await asyncio.gather(*(loop() for _ in range(connections)))
    return done / seconds


async def open_loop(client: Client, rate: float, seconds: float, window_s: float, report) -> list[Window]:  # type: ignore[no-untyped-def]
    """Requests scheduled at ``rate``/s for ``seconds``; one ``Window`` per ``window_s``."""
    start = time.monotonic()
    windows: list[Window] = []
    tasks: set[asyncio.Task[None]] = set()

    async def one(scheduled: float, window: Window) -> None:
        status = await client.post()
        window.statuses[status] += 1
        if status == 200:
            window.latencies.append(time.monotonic() - scheduled)

    n = 0
    while (scheduled := start + n / rate) < start + seconds:
        index = int((scheduled - start) // window_s)
        while len(windows) <= index:
            if windows:
                report(len(windows), windows[-1])
            windows.append(Window())
        if scheduled > time.monotonic():
            await asyncio.sleep(max(0.002, scheduled - time.monotonic()))  # send what is due in 2 ms ticks
        windows[index].sent += 1
        task = asyncio.create_task(one(scheduled, windows[index]))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        n += 1
    await asyncio.gather(*tasks)
    report(len(windows), windows[-1])
    return windows


def rss_mib(pid: int) -> float:
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return 0.0


def children(pid: int) -> list[int]:
    kids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    kids.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                continue
    return kids


async def main_async(args: argparse.Namespace, server_pid: int, port: int) -> dict[str, object]:
    client = Client(port, "/predictions/mlp", 64)
    await closed_loop(client, 3, 8)  # warm-up
    capacity = await closed_loop(client, 10, 32)
    print(f"capacity (closed loop, 32 connections, 10 s): {capacity:.0f} req/s", flush=True)

    def process_line() -> str:
        workers = children(server_pid)
        fds = len(os.listdir(f"/proc/{server_pid}/fd"))
        return (
            f"front-end RSS={rss_mib(server_pid):.1f}MiB workers RSS={sum(rss_mib(w) for w in workers):.1f}MiB "
            f"({len(workers)}) fds={fds}"
        )

    def report(number: int, window: Window) -> None:
        print(f"  minute {number}: {window.line()} | {process_line()}", flush=True)

    soak_rate = 0.7 * capacity
    print(f"soak: {soak_rate:.0f} req/s (70 %) for {args.minutes} min", flush=True)
    soak = await open_loop(client, soak_rate, args.minutes * 60, 60, report)
    total = Window(
        sum(w.sent for w in soak), sum((w.statuses for w in soak), Counter()), [x for w in soak for x in w.latencies]
    )
    print(f"soak total: {total.line()} client errors={dict(client.failures)}", flush=True)

    print(f"overload: {2 * capacity:.0f} req/s (200 %) for {args.overload_seconds} s", flush=True)
    flood = Client(port, "/predictions/mlp", 512)  # more connections than the model's queue (100) holds
    overload = await open_loop(flood, 2 * capacity, args.overload_seconds, args.overload_seconds, lambda n, w: None)
    shed = overload[0].statuses.get(503, 0)
    print(f"overload: {overload[0].line()} shed_503={shed} client errors={dict(flood.failures)}", flush=True)

    baseline_p50 = sorted(total.latencies)[len(total.latencies) // 2]
    recovery = await open_loop(client, soak_rate, 30, 1, lambda n, w: None)
    back = next(
        (
            i + 1
            for i, w in enumerate(recovery)
            if w.latencies
            and not set(w.statuses) - {200}
            and sorted(w.latencies)[len(w.latencies) // 2] <= 2 * baseline_p50
        ),
        None,
    )
    print(
        f"recovery: latency back within 2x of the soak p50 ({baseline_p50 * 1000:.2f} ms) after "
        f"{back if back is not None else '>30'} s; then {process_line()}",
        flush=True,
    )
    return {
        "capacity": capacity,
        "soak_sent": total.sent,
        "soak_statuses": dict(total.statuses),
        "overload_statuses": dict(overload[0].statuses),
        "recovery_s": back,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--overload-seconds", type=float, default=60)
    args = parser.parse_args()
    ports = [free_port() for _ in range(3)]
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "config.properties"
        config.write_text(
            "".join(
                f"{k}_address=http://127.0.0.1:{p}\n"
                for k, p in zip(("inference", "management", "metrics"), ports, strict=True)
            )
        )
        command = [
            sys.executable,
            "-m",
            "servekit",
            "start",
            "--foreground",
            "--ncs",
            "--disable-token-auth",
            "--model-store",
            str(REPO / "model_store"),
            "--models",
            "mlp=mlp",
            "--ts-config",
            str(config),
        ]
        with open(Path(tmp) / "server.log", "wb") as log:
            server = subprocess.Popen(command, cwd=tmp, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                try:
                    with socket.create_connection(("127.0.0.1", ports[0]), timeout=1):
                        break
                except OSError:
                    time.sleep(0.2)
            time.sleep(2)
            result = asyncio.run(main_async(args, server.pid, ports[0]))
            print("RESULT " + json.dumps(result))
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
