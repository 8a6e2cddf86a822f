"""WorkerPool: the worker processes of one model version.

Each worker is a spawned ``python -m servekit.worker`` process connected by a socket pair that the
pool creates. ``acquire`` hands out an idle worker (waiting for one if all are busy), ``run`` sends it
one batch and gives it back. A worker that dies is replaced with capped exponential back-off; the
batch it held fails with ``WorkerDiedError``, never silently. Scaling down retires idle workers at
once and busy ones when their batch is done.

Runs in the front-end process (asyncio); never imports the handler or torch.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from servekit import protocol
from servekit.errors import (
    HandlerError,
    ProtocolError,
    ResponseTimeoutError,
    ServekitError,
    ServiceUnavailableError,
    WorkerDiedError,
)

logger = logging.getLogger("servekit.pool")

BACKOFF_S = (1, 1, 2, 3, 5, 8, 13, 21, 34, 55)  # restart delays; the last one repeats
CRASH_LOOP = 3  # consecutive worker failures after which, with no worker ready, requests are refused at once
NO_WORKER = "has no worker to serve inference request. Please use scale workers API to add workers."
FRAME_OVERHEAD = 1 << 20  # headers and JSON around the payloads of one response frame
_ids = itertools.count(9000)  # worker ids as TorchServe numbers them


@dataclass(frozen=True, slots=True)
class PoolSettings:
    response_timeout: float
    startup_timeout: float
    max_response_size: int
    gpu_ids: tuple[int, ...] = ()  # round-robin over these; empty = CPU


class WorkerProcess:
    """One spawned worker and the socket to it."""

    def __init__(
        self,
        command: protocol.LoadCommand,
        settings: PoolSettings,
        on_exit: Callable[[WorkerProcess], None] = lambda worker: None,
    ) -> None:
        self.id = str(next(_ids))
        self._on_exit = on_exit
        self._watcher: asyncio.Task[None] | None = None
        self._output: asyncio.Task[None] | None = None
        self.command = command
        self.settings = settings
        self.start_time = time.time()
        self.status = "STARTING"
        self.retiring = False
        self.process: asyncio.subprocess.Process | None = None
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    @property
    def gpu_id(self) -> int | None:
        return self.command.gpu_id

    def memory_usage(self) -> int:
        """Resident set size in bytes (0 once the process is gone)."""
        try:
            pages = int(Path(f"/proc/{self.pid}/statm").read_text().split()[1])
        except (OSError, IndexError, ValueError):
            return 0
        return pages * os.sysconf("SC_PAGE_SIZE")

    async def start(self) -> None:
        """Spawn the process and load the model; raises ``HandlerError`` if the load fails."""
        parent, child = socket.socketpair()
        threads = str(self.command.torch_threads)  # torch reads these at import: no oversubscribed cores
        try:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "servekit.worker",
                "--fd",
                str(child.fileno()),
                "--parent",
                str(os.getpid()),
                pass_fds=(child.fileno(),),
                cwd=self.command.model_dir,
                env={**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads},
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
            )
        except BaseException:
            parent.close()
            raise
        finally:
            child.close()
        assert self.process.stdout is not None
        self._output = asyncio.get_running_loop().create_task(self._relay_output(self.process.stdout))
        self._reader, self._writer = await asyncio.open_unix_connection(sock=parent, limit=2**20)
        try:
            await self._send(protocol.encode_load(self.command))
            header, _ = await asyncio.wait_for(self._receive(1), self.settings.startup_timeout)
        except TimeoutError:
            await self.kill()
            raise HandlerError(
                f"Worker for model {self.command.model_name} did not load within "
                f"startup_timeout={self.settings.startup_timeout:g}s"
            ) from None
        except (ProtocolError, asyncio.IncompleteReadError, ConnectionError):
            code = await self.kill()
            raise HandlerError(
                f"Worker for model {self.command.model_name} exited while loading ({describe_exit(code)})"
            ) from None
        if header.get("op") == "failure":
            failure = protocol.decode_failure(header)
            await self.kill()
            raise HandlerError(f"Failed to load model {self.command.model_name}: {failure.kind}: {failure.message}")
        self.status = "READY"
        self._watcher = asyncio.get_running_loop().create_task(self._watch())

    @property
    def name(self) -> str:
        return f"W-{self.id}-{self.command.model_name}"

    async def _relay_output(self, stream: asyncio.StreamReader) -> None:
        """The worker's stdout and stderr (handler prints, tracebacks) into the server log, line by line."""
        worker_log = logging.getLogger("servekit.worker")
        while True:
            try:
                line = await stream.readline()
            except ValueError:  # a line over the stream's limit: pass on what is buffered
                line = await stream.read(2**16)
            if not line:
                return
            worker_log.info("[%s] %s", self.name, line.decode(errors="replace").rstrip(), extra={"worker": self.name})

    async def _watch(self) -> None:
        """Notice a worker that exits on its own (crash, OOM kill) even while it is idle."""
        assert self.process is not None
        code = await self.process.wait()
        if self.status == "READY":
            self.status = "UNLOADING"
            if self._writer is not None:
                self._writer.close()
            logger.warning("worker %s of %s exited: %s", self.id, self.command.model_name, describe_exit(code))
            self._on_exit(self)

    async def run(self, requests: list[protocol.Request]) -> protocol.BatchResult:
        """One batch; raises ``WorkerDiedError``/``ResponseTimeoutError`` after which the worker is dead."""
        try:
            await self._send(protocol.encode_batch(requests))
            header, parts = await asyncio.wait_for(self._receive(len(requests)), self.settings.response_timeout)
        except TimeoutError:
            await self.kill()
            raise ResponseTimeoutError(
                f"Model {self.command.model_name} did not answer within "
                f"response_timeout={self.settings.response_timeout:g}s; its worker was restarted"
            ) from None
        except (ProtocolError, asyncio.IncompleteReadError, ConnectionError) as exc:
            code = await self.kill()
            reason = str(exc) if isinstance(exc, ProtocolError) else describe_exit(code)
            raise WorkerDiedError(f"Worker died while running model {self.command.model_name}: {reason}") from None
        try:
            return protocol.decode_result(header, parts, len(requests))
        except ProtocolError as exc:
            await self.kill()
            raise WorkerDiedError(f"Worker of model {self.command.model_name} sent a bad frame: {exc}") from None

    async def _send(self, buffers: list[bytes | bytearray | memoryview]) -> None:
        assert self._writer is not None
        self._writer.writelines(buffers)
        await self._writer.drain()

    async def _receive(self, n_requests: int) -> tuple[dict[str, object], list[memoryview]]:
        assert self._reader is not None
        (total,) = protocol.LENGTH.unpack(await self._reader.readexactly(protocol.LENGTH.size))
        limit = self.settings.max_response_size * n_requests + FRAME_OVERHEAD
        if total > limit:
            raise ProtocolError(f"frame of {total} bytes exceeds the limit of {limit}")
        return protocol.decode(await self._reader.readexactly(total))

    async def stop(self, timeout: float = 5.0) -> None:
        """Close the socket (the worker exits), then TERM and KILL if it lingers."""
        self.status = "UNLOADING"
        if self._writer is not None:
            self._writer.close()
        if self.process is None or self.process.returncode is not None:
            return
        try:
            await asyncio.wait_for(self.process.wait(), timeout)
        except TimeoutError:
            await self.kill()

    async def kill(self) -> int | None:
        """Terminate now and reap; returns the exit code (negative: the signal)."""
        self.status = "UNLOADING"
        if self._writer is not None:
            self._writer.close()
        if self.process is None:
            return None
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.terminate()
            try:
                await asyncio.wait_for(self.process.wait(), 2.0)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self.process.kill()
                await self.process.wait()
        return self.process.returncode


def describe_exit(code: int | None) -> str:
    if code is None:
        return "no process"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


class WorkerPool:
    """The workers of one model version, with a target size that ``scale`` changes."""

    def __init__(
        self,
        command_for: Callable[[int | None], protocol.LoadCommand],
        settings: PoolSettings,
        on_loaded: Callable[[WorkerProcess, float], None] = lambda worker, seconds: None,
    ) -> None:
        self._command_for = command_for
        self._on_loaded = on_loaded
        self.restarts = 0
        self.settings = settings
        self.workers: list[WorkerProcess] = []
        self.target = 0
        self._idle: collections.deque[WorkerProcess] = collections.deque()
        self._waiters: collections.deque[asyncio.Future[WorkerProcess]] = collections.deque()
        self._restarts: set[asyncio.Task[None]] = set()
        self._failures = 0
        self._gpu_cycle = itertools.cycle(settings.gpu_ids) if settings.gpu_ids else None
        self.closed = False

    @property
    def ready(self) -> int:
        return sum(1 for w in self.workers if w.status == "READY" and not w.retiring)

    @property
    def busy(self) -> int:
        return sum(1 for w in self.workers if w.status == "READY" and w not in self._idle)

    def unavailable(self) -> str | None:
        """Why requests cannot be served now: no workers wanted, or every worker keeps crashing."""
        if self.target == 0 or self.closed:
            return NO_WORKER
        if self._failures >= CRASH_LOOP and self.ready == 0:
            return f"has no healthy worker: its workers failed {self._failures} times in a row and are restarting"
        return None

    def acquire(self) -> asyncio.Future[WorkerProcess]:
        """A future for an idle worker; fails with ``ServiceUnavailableError`` while ``unavailable``."""
        future: asyncio.Future[WorkerProcess] = asyncio.get_running_loop().create_future()
        reason = None if self._idle else self.unavailable()
        if self._idle:
            future.set_result(self._idle.popleft())
        elif reason is not None:
            future.set_exception(ServiceUnavailableError(reason))
        else:
            self._waiters.append(future)
        return future

    async def run(self, worker: WorkerProcess, requests: list[protocol.Request]) -> protocol.BatchResult:
        """Run one batch on an acquired worker, then give the worker back (or replace it if it died)."""
        try:
            outcome = await worker.run(requests)
        except ServekitError:
            self._on_death(worker)
            raise
        self._failures = 0
        self.release(worker)
        return outcome

    def release(self, worker: WorkerProcess) -> None:
        if worker.retiring or self.closed:
            self._discard(worker)
            asyncio.get_running_loop().create_task(worker.stop(self.settings.response_timeout))
            return
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(worker)
                return
        self._idle.append(worker)

    def _discard(self, worker: WorkerProcess) -> None:
        if worker in self.workers:
            self.workers.remove(worker)
        if worker in self._idle:
            self._idle.remove(worker)

    def _on_death(self, worker: WorkerProcess) -> None:
        self._discard(worker)
        if not worker.retiring:
            logger.warning("worker %s of %s died", worker.id, worker.command.model_name)
            self._schedule_restart()

    def _schedule_restart(self) -> None:
        if self.closed or len(self.workers) + len(self._restarts) >= self.target:
            return
        delay = BACKOFF_S[min(self._failures, len(BACKOFF_S) - 1)]
        self._failures += 1
        reason = self.unavailable()
        if reason is not None:
            self._fail_waiters(reason)
        logger.warning("starting a replacement worker in %ss", delay)
        task = asyncio.get_running_loop().create_task(self._restart(delay))
        self._restarts.add(task)
        task.add_done_callback(self._restarts.discard)

    async def _restart(self, delay: float) -> None:
        await asyncio.sleep(delay)
        if self.closed or len(self.workers) >= self.target:
            return
        try:
            await self._add_worker()
            self.restarts += 1
        except ServekitError as exc:
            logger.error("restart failed: %s", exc.message)
            self._restarts.discard(asyncio.current_task())
            self._schedule_restart()

    def _on_exit(self, worker: WorkerProcess) -> None:
        if worker in self._idle:  # a busy worker's death is handled by run()
            self._on_death(worker)

    async def _add_worker(self) -> WorkerProcess:
        gpu_id = next(self._gpu_cycle) if self._gpu_cycle else None
        worker = WorkerProcess(self._command_for(gpu_id), self.settings, self._on_exit)
        self.workers.append(worker)
        started = time.monotonic()
        try:
            await worker.start()
            self._on_loaded(worker, time.monotonic() - started)
        except BaseException:
            self._discard(worker)
            await worker.kill()
            raise
        self.release(worker)
        return worker

    async def scale(self, n: int) -> None:
        """Grow or shrink to ``n`` workers. Growing waits until the new workers have loaded the model
        and raises ``HandlerError`` (with the handler's message) if any failed; shrinking retires idle
        workers now and busy ones after their batch."""
        self.target = n
        active = [w for w in self.workers if not w.retiring]
        if len(active) < n:
            results = await asyncio.gather(
                *(self._add_worker() for _ in range(n - len(active))), return_exceptions=True
            )
            errors = [r for r in results if isinstance(r, BaseException)]
            if errors:
                raise errors[0]
            return
        active.sort(key=lambda w: w not in self._idle)  # retire idle workers first
        for worker in active[: len(active) - n]:
            worker.retiring = True
            if worker in self._idle:
                self._discard(worker)
                await worker.stop(self.settings.response_timeout)
        if n == 0:
            self._fail_waiters(NO_WORKER)

    def _fail_waiters(self, reason: str) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(ServiceUnavailableError(reason))

    async def close(self) -> None:
        """Stop every worker and cancel pending restarts."""
        self.closed = True
        self.target = 0
        for task in list(self._restarts):
            task.cancel()
        self._fail_waiters(NO_WORKER)
        workers, self.workers = list(self.workers), []
        self._idle.clear()
        await asyncio.gather(*(w.stop(self.settings.response_timeout) for w in workers))
