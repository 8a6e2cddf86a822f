"""WorkerPool: the worker processes of one model version.

Each worker is a ``WorkerProcess`` (``servekit.process``): a spawned ``python -m servekit.worker`` connected by a
socket pair. ``acquire`` hands out an idle worker (waiting for one if all are busy), ``run`` sends it
one batch and gives it back. A worker that dies is replaced with capped exponential back-off; the
batch it held fails with ``WorkerDiedError``, never silently. Scaling down retires idle workers at
once and busy ones when their batch is done.

Runs in the front-end process (asyncio); never imports the handler or torch.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import time
from collections.abc import Callable, Collection

from servekit import protocol
from servekit.errors import ServekitError, ServiceUnavailableError
from servekit.inputs import InputCheck
from servekit.process import OnChunks, PoolSettings, WorkerProcess

logger = logging.getLogger("servekit.pool")

BACKOFF_S = (1, 1, 2, 3, 5, 8, 13, 21, 34, 55)  # restart delays; the last one repeats
CRASH_LOOP = 3  # consecutive worker failures after which, with no worker ready, requests are refused at once
NO_WORKER = (  # TorchServe's words, sequence batching and all, so that what matches its answers matches ours
    "has no worker to serve inference request. Please use scale workers API to add workers. If this is a sequence"
    " inference, please check if it is closed, or expired; or exceeds maxSequenceJobQueueSize"
)


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
        self._urgent: collections.deque[asyncio.Future[WorkerProcess]] = collections.deque()  # served first
        self._restarts: set[asyncio.Task[None]] = set()
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
        """The result of the batch last sent to ``worker``; if the worker died, it is replaced and the error
        raised. The worker stays acquired: ``send`` it the next batch, or ``release`` it."""
        try:
            outcome = await worker.receive_batch(n_requests, on_chunks)
        except ServekitError:
            self._on_death(worker)
            raise
        self._failures = 0
        return outcome

    def drop(self, worker: WorkerProcess, request_ids: list[str]) -> None:
        """Continuous batching: ask an acquired worker to drop these requests (their clients went away)."""
        worker.send_drop(request_ids)

    async def step(self, worker: WorkerProcess, running: Collection[str]) -> protocol.Step:
        """Continuous batching: the next step of an acquired worker whose requests in flight are ``running``; if the
        worker died, it is replaced and the error raised, as in ``collect``."""
        try:
            step = await worker.receive_step(running)
        except ServekitError:
            self._on_death(worker)
            raise
        self._failures = 0
        return step

    def keeps(self, worker: WorkerProcess) -> bool:
        """Whether an acquired worker may take another batch before it is released (not when it retires)."""
        return not (worker.retiring or self.closed or self._urgent)

    def release(self, worker: WorkerProcess) -> None:
        if worker.retiring or self.closed:
            self._discard(worker)
            asyncio.get_running_loop().create_task(worker.stop(self.settings.response_timeout))
            return
        while self._urgent or self._waiters:
            waiter = (self._urgent or self._waiters).popleft()
            if not waiter.done():
                waiter.set_result(worker)
                return
        self._idle.append(worker)

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
        while self._urgent or self._waiters:
            waiter = (self._urgent or self._waiters).popleft()
            if not waiter.done():
                waiter.set_exception(ServiceUnavailableError(reason))

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
