"""WorkerPool: the worker processes of one model version.

Each worker is a ``WorkerProcess`` (``servekit.process``): a spawned ``python -m servekit.worker`` connected by a
socket pair. The batcher hands the pool each batch with ``run``, one call that returns the batch's result: the pool
sends it to an idle worker, else into the pipeline of a busy one, and reads each worker's results in the order its
batches were sent. While requests wait, a worker holds ``PIPELINE`` batches: the one it runs and the next, sent before
the first one's result is read, so that it starts the next the moment it is done, however busy the event loop is
(under overload one turn of the loop can outlast a batch: issue 13). Batchers that hold workers (continuous and
sequence batching: lanes) ``acquire`` one, ``send``/``collect`` or ``step`` on it, and ``release`` it.

A worker dies when it exits, misses ``response_timeout`` or sends a malformed frame (``WorkerProcess`` kills it then).
One method handles that, ``_lost``: the batch the worker was running fails with the error that says why
(``WorkerDiedError``, ``ResponseTimeoutError``), once and never silently; batches sent behind it never ran and go to
other workers; a replacement starts after a capped exponential back-off. Scaling down retires idle workers at once
and busy ones when their batches are done.

Runs in the front-end process (asyncio); never imports the handler or torch.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

from servekit import protocol
from servekit.errors import ServekitError, ServiceUnavailableError
from servekit.inputs import InputCheck
from servekit.process import OnChunks, PoolSettings, WorkerProcess

logger = logging.getLogger("servekit.pool")

T = TypeVar("T")
BACKOFF_S = (1, 1, 2, 3, 5, 8, 13, 21, 34, 55)  # restart delays; the last one repeats
CRASH_LOOP = 3  # consecutive worker failures after which, with no worker ready, requests are refused at once
PIPELINE = 2  # batches a busy worker holds while requests wait: the one it runs and the next
NO_WORKER = (  # TorchServe's words, sequence batching and all, so that what matches its answers matches ours
    "has no worker to serve inference request. Please use scale workers API to add workers. If this is a sequence"
    " inference, please check if it is closed, or expired; or exceeds maxSequenceJobQueueSize"
)

Spawn = Callable[[protocol.LoadCommand, PoolSettings, Callable[[WorkerProcess], None]], WorkerProcess]
Sleep = Callable[[float], Awaitable[None]]


@dataclass(eq=False, slots=True)
class _Batch:
    """A batch handed to ``run``, until its result is read."""

    requests: list[protocol.Request]
    on_chunks: OnChunks | None
    turn: asyncio.Future[WorkerProcess]  # set to its worker once its result is that worker's next frame
    worker: WorkerProcess | None = None  # where it was sent; None while it waits for a worker
    started: float = 0.0  # when its worker could start it (perf_counter): its send, or the end of the batch before it
    abandoned: bool = False  # its caller stopped waiting


class WorkerPool:
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
        self._command_for = command_for
        self._on_loaded = on_loaded
        self._spawn = spawn
        self._sleep = sleep
        self.restarts = 0
        self.settings = settings
        self.workers: list[WorkerProcess] = []
        self.target = 0
        self._idle: collections.deque[WorkerProcess] = collections.deque()
        self._waiters: collections.deque[asyncio.Future[WorkerProcess]] = collections.deque()
        self._urgent: collections.deque[asyncio.Future[WorkerProcess]] = collections.deque()  # served first
        self._idle_waiters: list[asyncio.Future[None]] = []  # ``wait_idle`` callers
        self._lines: dict[WorkerProcess, collections.deque[_Batch]] = {}  # batches sent by ``run``, the running first
        self._backlog: collections.deque[_Batch] = collections.deque()  # batches of ``run`` waiting for a worker
        self._restarts: set[asyncio.Task[None]] = set()
        self._stopping: set[asyncio.Task[Any]] = set()  # workers stopped in the background
        self._failures = 0
        self._gpu_cycle = itertools.cycle(settings.gpu_ids) if settings.gpu_ids else None
        self.closed = False
        self.input_check: InputCheck | None = None  # the handler's declared input (servekit.inputs)
        # When each request sent to a worker was sent (perf_counter), by request id, until whoever submitted it
        # takes the entry (``servekit.api.dispatch``: TorchServe's queue latency is counted per answered request).
        self.sent: dict[str, float] = {}

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

    # The batcher's side: run a batch.

    async def wait_idle(self) -> None:
        """Return once a worker is idle; raises ``ServiceUnavailableError`` while ``unavailable`` and none is."""
        while not self._idle:
            if (reason := self.unavailable()) is not None:
                raise ServiceUnavailableError(reason)
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._idle_waiters.append(waiter)
            await waiter

    def room(self) -> bool:
        """Whether ``run`` sends a batch at once: a worker is idle, or a busy one has room in its pipeline, and no
        batch waits for a worker."""
        return not self._backlog and (bool(self._idle) or self._pipeline() is not None)

    def run(
        self, requests: list[protocol.Request], on_chunks: OnChunks | None = None
    ) -> Awaitable[protocol.BatchResult]:
        """Run a batch: sent before this returns when there is ``room``, else once a worker is free. The awaitable
        gives its result, or raises the error that failed it: ``WorkerDiedError``/``ResponseTimeoutError`` when its
        worker died running it (the pool replaces the worker), ``ServiceUnavailableError`` when no worker is left to
        run it. Chunks of streamed responses go to ``on_chunks`` as they come. Await it to its end: a caller that
        stops waiting for a batch it sent costs the pool that worker."""
        batch = _Batch(requests, on_chunks, asyncio.get_running_loop().create_future())
        self._place(batch)
        return self._result(batch)

    async def _result(self, batch: _Batch) -> protocol.BatchResult:
        try:
            worker = await batch.turn
            result = await self._receive(worker, worker.receive_batch(len(batch.requests), batch.on_chunks))
        except BaseException as exc:
            if not isinstance(exc, ServekitError):  # cancelled: the worker's answers are out of step with its line
                self._abandon(batch)
            raise
        self._next(worker)
        roundtrip_ms = (time.perf_counter() - batch.started) * 1000
        return protocol.BatchResult(result.outcome, result.handler_ms, result.metrics, roundtrip_ms)

    def _place(self, batch: _Batch) -> None:
        """Send ``batch`` to an idle worker, else into the pipeline of a busy one; else it waits for a worker, after
        the batches already waiting (``_next``, ``release``), or fails while ``unavailable``."""
        worker = None if self._backlog else self._idle.popleft() if self._idle else self._pipeline()
        if worker is not None:
            self._hand(worker, batch)
        elif (reason := self.unavailable()) is not None:
            batch.turn.set_exception(ServiceUnavailableError(reason))
        else:
            self._backlog.append(batch)

    def _pipeline(self) -> WorkerProcess | None:
        """A busy worker with room in its pipeline, that may keep taking batches (``keeps``)."""
        if self.closed or self._urgent:
            return None
        for worker, line in self._lines.items():
            if len(line) < PIPELINE and not worker.retiring:
                return worker
        return None

    def _hand(self, worker: WorkerProcess, batch: _Batch) -> None:
        self.send(worker, batch.requests)
        batch.worker = worker
        line = self._lines.setdefault(worker, collections.deque())
        line.append(batch)
        if len(line) == 1:
            batch.started = time.perf_counter()
            batch.turn.set_result(worker)

    def _next(self, worker: WorkerProcess) -> None:
        """The running batch of ``worker`` was answered: the next one's turn (and a batch waiting for a worker takes
        its place in the pipeline), or the worker goes back."""
        line = self._lines[worker]
        line.popleft()
        if line:
            line[0].started = time.perf_counter()
            line[0].turn.set_result(worker)
            if self._backlog and len(line) < PIPELINE and self.keeps(worker):
                self._hand(worker, self._backlog.popleft())
        else:
            del self._lines[worker]
            self.release(worker)

    def _abandon(self, batch: _Batch) -> None:
        """Its caller stopped waiting: a batch that waits for a worker is forgotten; one that was sent leaves its
        worker's answers out of step with the batches sent to it, so the worker is lost."""
        batch.abandoned = True
        if batch.worker is None:
            with contextlib.suppress(ValueError):
                self._backlog.remove(batch)
            return
        worker = batch.worker
        self._lost(worker)
        self._stop(worker.kill())

    # Lanes: batchers that hold workers (continuous and sequence batching), and describe requests.

    def acquire(self, urgent: bool = False) -> asyncio.Future[WorkerProcess]:
        """A future for an idle worker; fails with ``ServiceUnavailableError`` while ``unavailable``. An ``urgent``
        caller gets the next worker released, before the batcher, whose busy workers then take no more batches."""
        future: asyncio.Future[WorkerProcess] = asyncio.get_running_loop().create_future()
        reason = None if self._idle else self.unavailable()
        if self._idle:
            future.set_result(self._idle.popleft())
        elif reason is not None:
            future.set_exception(ServiceUnavailableError(reason))
        else:
            (self._urgent if urgent else self._waiters).append(future)
        return future

    def send(self, worker: WorkerProcess, requests: list[protocol.Request]) -> None:
        """Hand an acquired worker a batch; ``collect`` waits for its result."""
        worker.send_batch(requests)
        now = time.perf_counter()
        for request in requests:
            self.sent[request.request_id] = now

    async def collect(
        self, worker: WorkerProcess, n_requests: int, on_chunks: OnChunks | None = None
    ) -> protocol.BatchResult:
        """The result of the batch last sent to an acquired worker; if the worker died, the error. The worker stays
        acquired: ``send`` it the next batch, or ``release`` it."""
        return await self._receive(worker, worker.receive_batch(n_requests, on_chunks))

    def drop(self, worker: WorkerProcess, request_ids: list[str]) -> None:
        """Continuous batching: ask an acquired worker to drop these requests (their clients went away)."""
        worker.send_drop(request_ids)

    async def step(self, worker: WorkerProcess, running: Collection[str]) -> protocol.Step:
        """Continuous batching: the next step of an acquired worker whose requests in flight are ``running``; if the
        worker died, the error, as in ``collect``."""
        return await self._receive(worker, worker.receive_step(running))

    def keeps(self, worker: WorkerProcess) -> bool:
        """Whether a busy worker may take another batch before it is released (not when it retires)."""
        return not (worker.retiring or self.closed or self._urgent)

    def release(self, worker: WorkerProcess) -> None:
        """Give a worker back: to an urgent caller (a describe request), a batch waiting for a worker, a lane waiting
        for one, else idle."""
        if worker.retiring or self.closed:
            self._discard(worker)
            self._stop(worker.stop(self.settings.response_timeout))
            return
        if _hand_to(self._urgent, worker):
            return
        if self._backlog:
            self._hand(worker, self._backlog.popleft())
            return
        if _hand_to(self._waiters, worker):
            return
        self._idle.append(worker)
        waiters, self._idle_waiters = self._idle_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

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
            if not batch.abandoned:
                batch.worker = None
                self._place(batch)
        if known and not worker.retiring:
            logger.warning("worker %s of %s died", worker.id, worker.command.model_name)
            self._schedule_restart()

    def _on_exit(self, worker: WorkerProcess) -> None:
        if worker in self._idle:  # a busy worker's death is noticed by whoever waits for its answer
            self._lost(worker)

    def _discard(self, worker: WorkerProcess) -> None:
        if worker in self.workers:
            self.workers.remove(worker)
        if worker in self._idle:
            self._idle.remove(worker)

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

    def _stop(self, stopping: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(stopping)
        self._stopping.add(task)
        task.add_done_callback(self._stopping.discard)

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

    def _fail_waiters(self, reason: str) -> None:
        """Everyone waiting for a worker fails with ``ServiceUnavailableError(reason)``."""
        waiters: list[asyncio.Future[Any]] = [*self._urgent, *self._waiters, *self._idle_waiters]
        for waiter in waiters + [batch.turn for batch in self._backlog]:
            if not waiter.done():
                waiter.set_exception(ServiceUnavailableError(reason))
        self._urgent.clear()
        self._waiters.clear()
        self._idle_waiters.clear()
        self._backlog.clear()

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


def _hand_to(waiters: collections.deque[asyncio.Future[WorkerProcess]], worker: WorkerProcess) -> bool:
    """Give ``worker`` to the first of ``waiters`` still waiting; whether there was one."""
    while waiters:
        waiter = waiters.popleft()
        if not waiter.done():
            waiter.set_result(worker)
            return True
    return False
