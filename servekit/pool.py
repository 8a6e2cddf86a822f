"""WorkerPool: the worker processes of one model version.

Each worker is a ``WorkerProcess`` (``servekit.process``): a spawned ``python -m servekit.worker`` connected by a
socket pair. The batcher hands the pool each batch with ``run``, one call that returns the batch's result. Batchers
that hold workers (continuous and sequence batching: lanes) ``acquire`` one, ``send``/``collect`` or ``step`` on it,
and ``release`` it. Which worker runs what, pipelines included, and who waits for one is ``WorkerQueue``'s
(``servekit.pool_queue``); the pool adds what awaits its processes: their answers, their deaths, restarts and size.

A worker dies when it exits, misses ``response_timeout`` or sends a malformed frame (``WorkerProcess`` kills it then).
One method handles that, ``_lost``: the batch the worker was running fails with the error that says why
(``WorkerDiedError``, ``ResponseTimeoutError``), once and never silently; batches sent behind it never ran and go to
other workers; a replacement starts after a capped exponential back-off. Scaling down retires idle workers at once
and busy ones when their batches are done.

Runs in the front-end process (asyncio); never imports the handler or torch.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Coroutine
from typing import Any, TypeVar

from servekit import protocol
from servekit.errors import ServekitError
from servekit.inputs import InputCheck
from servekit.pool_queue import NO_WORKER, Batch, WorkerQueue
from servekit.process import OnChunks, PoolSettings, WorkerProcess

logger = logging.getLogger("servekit.pool")

T = TypeVar("T")
BACKOFF_S = (1, 1, 2, 3, 5, 8, 13, 21, 34, 55)  # restart delays; the last one repeats

Spawn = Callable[[protocol.LoadCommand, PoolSettings, Callable[[WorkerProcess], None]], WorkerProcess]
Sleep = Callable[[float], Awaitable[None]]


class WorkerPool(WorkerQueue):
    """The workers of one model version, with a target size that ``scale`` changes. ``spawn`` makes a worker and
    ``sleep`` waits out a restart's back-off (tests pass fakes: no process, no clock)."""

    def __init__(
        self,
        command_for: Callable[[int | None], protocol.LoadCommand],
        settings: PoolSettings,
        on_loaded: Callable[[WorkerProcess, float], None] = lambda worker, seconds: None,
        *,
        spawn: Spawn = WorkerProcess,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        super().__init__(settings)
        self._command_for = command_for
        self._on_loaded = on_loaded
        self._spawn = spawn
        self._sleep = sleep
        self.restarts = 0
        self._restarts: set[asyncio.Task[None]] = set()
        self._readers: dict[WorkerProcess, asyncio.Task[None]] = {}  # of the workers with a line (``_read_line``)
        self._gpu_cycle = itertools.cycle(settings.gpu_ids) if settings.gpu_ids else None
        self.input_check: InputCheck | None = None  # the handler's declared input (servekit.inputs)

    # The batcher's side: run a batch.

    def run(
        self, requests: list[protocol.Request], on_chunks: OnChunks | None = None, overloaded: bool = False
    ) -> asyncio.Future[protocol.BatchResult]:
        """Run a batch: sent before this returns when there is ``room(overloaded)`` (``overloaded``: the batcher refuses
        requests and this batch is full, so it may go into a deeper pipeline), else once a worker is free. The future
        gives its result, or the error that failed it: ``WorkerDiedError``/``ResponseTimeoutError`` when its worker
        died running it (the pool replaces the worker), ``ServiceUnavailableError`` when no worker is left to run it.
        Chunks of streamed responses go to ``on_chunks`` as they come. A caller that cancels it costs nothing: a batch
        not yet sent is dropped, the answer of one sent is read and dropped."""
        batch = Batch(requests, on_chunks, asyncio.get_running_loop().create_future(), overloaded)
        self._place(batch)
        return batch.result

    def _read(self, worker: WorkerProcess) -> None:
        if worker not in self._readers:  # else the one reading its last line goes on with this one
            self._readers[worker] = asyncio.get_running_loop().create_task(self._read_line(worker))

    async def _read_line(self, worker: WorkerProcess) -> None:
        """Read the results of the batches sent to ``worker``, in order, while it has a line: one task, which reads
        every result already arrived in one turn of the event loop and hands the pipeline's next batch over before
        any caller wakes (issue 13)."""
        try:
            while (line := self._lines.get(worker)) is not None:
                batch = line[0]
                try:
                    answer = await self._receive(worker, worker.receive_batch(len(batch.requests), batch.on_chunks))
                except ServekitError as exc:  # ``_lost`` took the worker's line
                    if not batch.result.done():
                        batch.result.set_exception(exc)
                    return
                self._next(worker)
                if answer.handler_ms > 0:
                    self.measured(answer.handler_ms / 1000)
                if not batch.result.done():
                    roundtrip_ms = (time.perf_counter() - batch.started) * 1000
                    batch.result.set_result(
                        protocol.BatchResult(answer.outcome, answer.handler_ms, answer.metrics, roundtrip_ms)
                    )
        finally:
            del self._readers[worker]  # at once: a line opened from now on needs a reader of its own

    # Lanes: the answers of acquired workers, and describe requests.

    async def collect(
        self, worker: WorkerProcess, n_requests: int, on_chunks: OnChunks | None = None
    ) -> protocol.BatchResult:
        """The result of the batch last sent to an acquired worker; if the worker died, the error. The worker stays
        acquired: ``send`` it the next batch, or ``release`` it."""
        return await self._receive(worker, worker.receive_batch(n_requests, on_chunks))

    async def step(self, worker: WorkerProcess, running: Collection[str]) -> protocol.Step:
        """Continuous batching: the next step of an acquired worker whose requests in flight are ``running``; if the
        worker died, the error, as in ``collect``."""
        return await self._receive(worker, worker.receive_step(running))

    async def describe(self, request: protocol.Request) -> protocol.BatchResult:
        """The handler's answer to a describe request (``Worker.describe``), from the first worker free: ahead of
        the batches queued. Runs to its end even when the caller is cancelled, so the worker is always given back;
        raises ``ServiceUnavailableError`` while ``unavailable``, or the error that lost the worker."""
        return await asyncio.shield(self._describe(request))

    async def _describe(self, request: protocol.Request) -> protocol.BatchResult:
        worker = await self.acquire(urgent=True)
        worker.send_describe(request)
        result = await self.collect(worker, 1)
        self.release(worker)
        return result

    # Death and restarts.

    async def _receive(self, worker: WorkerProcess, answer: Coroutine[Any, Any, T]) -> T:
        """What ``worker`` answers; when it died instead (``WorkerProcess`` killed it and says why), ``_lost``
        handles the death and the error is raised, to the caller of the batch it was running only."""
        try:
            value = await answer
        except ServekitError:
            self._lost(worker)
            raise
        self._failures = 0
        return value

    def _lost(self, worker: WorkerProcess) -> None:
        """The one place a worker's death is handled (a failed answer, an idle worker's exit, a caller that stopped
        waiting): the worker leaves the pool; the batches sent behind the one it ran never ran and go to other
        workers; a replacement is scheduled unless it was retiring. Safe to call again for the same worker."""
        known = worker in self.workers
        self._discard(worker)
        for batch in list(self._lines.pop(worker, ()))[1:]:
            if not batch.result.done():
                batch.worker = None
                self._place(batch)
        if known and not worker.retiring:
            logger.warning("worker %s of %s died", worker.id, worker.command.model_name)
            self._schedule_restart()

    def _on_exit(self, worker: WorkerProcess) -> None:
        if worker in self._idle:  # a busy worker's death is noticed by whoever waits for its answer
            self._lost(worker)

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
        await self._sleep(delay)
        if self.closed or len(self.workers) >= self.target:
            return
        try:
            await self._add_worker()
            self.restarts += 1
        except ServekitError as exc:
            logger.error("restart failed: %s", exc.message)
            self._restarts.discard(asyncio.current_task())
            self._schedule_restart()

    # Size.

    async def _add_worker(self) -> WorkerProcess:
        gpu_id = next(self._gpu_cycle) if self._gpu_cycle else None
        worker = self._spawn(self._command_for(gpu_id), self.settings, self._on_exit)
        self.workers.append(worker)
        started = time.monotonic()
        try:
            await worker.start()
            self._on_loaded(worker, time.monotonic() - started)
            self.input_check = worker.input_check
        except BaseException:
            self._discard(worker)
            await worker.kill()
            raise
        self.release(worker)
        return worker

    async def scale(self, n: int) -> None:
        """Grow or shrink to ``n`` workers. Growing waits until the new workers have loaded the model
        and raises ``HandlerError`` (with the handler's message) if any failed; shrinking retires idle
        workers now and busy ones after their batches."""
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

    async def close(self, timeout: float | None = None) -> bool:
        """Stop every worker (each gets ``timeout``, by default ``response_timeout``, to finish its batch and exit
        before it is killed) and cancel pending restarts. Returns whether every worker exited in time."""
        self.closed = True
        self.target = 0
        for task in list(self._restarts):
            task.cancel()
        self._fail_waiters(NO_WORKER)
        workers, self.workers = list(self.workers), []
        self._idle.clear()
        stop_timeout = self.settings.response_timeout if timeout is None else timeout
        return all(await asyncio.gather(*(w.stop(stop_timeout) for w in workers)))

    def reopen(self) -> None:
        """After ``close``: a pool with no workers again, which ``scale`` grows (the pool of a model kept after an
        unregister that timed out)."""
        self.closed = False
        self._failures = 0
