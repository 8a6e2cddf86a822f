"""WorkerQueue: which ready worker of a pool runs what next, and who waits for one. ``WorkerPool`` (``servekit.pool``)
extends it with what awaits the worker processes: their answers, their deaths, restarts and size.

A batch of ``run`` goes to an idle worker, else into the pipeline of a busy one, else waits for a worker (the
backlog); the batches sent to a worker form its line, whose results one reader per worker reads in the order they
were sent. While requests wait, a worker holds ``PIPELINE`` batches: the one it runs and the next, sent before the
first one's result is read, so that it starts the next the moment it is done. Under overload (the batcher refuses
requests and holds a full batch) the pipeline goes deeper, up to ``PIPELINE_S`` of the handler's measured time and
``MAX_PIPELINE`` batches, so that a fast model's worker has work for a turn of an event loop busy with refusals, which
can outlast many of its batches (issue 13). A slow model's pipeline stays two deep, and so does every pipeline below
overload: a deep one there gains nothing and makes the load bursty (W1 at 64 clients: p99 33-40 ms instead of 10-26),
and a request not yet sent waits in the batcher's queue, where one whose client went away or whose deadline passed is
dropped before it reaches a worker. Batchers that hold workers (lanes) ``acquire`` one and ``release`` it; an urgent
caller (a describe request) gets the next worker released, ahead of the backlog and the lanes. Nothing here awaits a
worker: it is bookkeeping, called on every batch.

Runs in the front-end process (asyncio); never imports the handler or torch.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import math
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

from servekit import protocol
from servekit.errors import ServiceUnavailableError
from servekit.process import OnChunks, PoolSettings, WorkerProcess

CRASH_LOOP = 3  # consecutive worker failures after which, with no worker ready, requests are refused at once
PIPELINE = 2  # batches a busy worker holds while requests wait: the one it runs and the next
PIPELINE_S = 0.01  # under overload, a busy worker holds batches for this much of its handler's time (measured)
MAX_PIPELINE = 64  # and at most this many (W1's batches of 0.2-0.5 ms: 20-50; 16 starved its worker, issue 13)
NO_WORKER = (  # TorchServe's words, sequence batching and all, so that what matches its answers matches ours
    "has no worker to serve inference request. Please use scale workers API to add workers. If this is a sequence"
    " inference, please check if it is closed, or expired; or exceeds maxSequenceJobQueueSize"
)


@dataclass(eq=False, slots=True)
class Batch:
    """A batch handed to ``run``, until its result is read."""

    requests: list[protocol.Request]
    on_chunks: OnChunks | None
    result: asyncio.Future[protocol.BatchResult]  # what ``run`` returns; cancelled when its caller stopped waiting
    overloaded: bool = False  # it may go into a line deeper than ``PIPELINE``
    worker: WorkerProcess | None = None  # where it was sent; None while it waits for a worker
    started: float = 0.0  # when its worker could start it (perf_counter): its send, or the end of the batch before it


class WorkerQueue:
    """The workers of one model version and who waits for them; ``target`` and ``closed`` are the pool's to set."""

    def __init__(self, settings: PoolSettings) -> None:
        self.settings = settings
        self.workers: list[WorkerProcess] = []
        self.target = 0
        self.closed = False
        self._failures = 0  # worker failures in a row (``WorkerPool`` counts them)
        self.batch_s = 0.0  # the handler's time per batch, a moving average (``measured``); 0: unknown
        self._deep = PIPELINE  # how many batches a busy worker holds under overload (``_depth``)
        self._idle: collections.deque[WorkerProcess] = collections.deque()
        self._waiters: collections.deque[asyncio.Future[WorkerProcess]] = collections.deque()
        self._urgent: collections.deque[asyncio.Future[WorkerProcess]] = collections.deque()  # served first
        self._idle_waiters: list[asyncio.Future[None]] = []  # ``wait_idle`` callers
        self._lines: dict[WorkerProcess, collections.deque[Batch]] = {}  # batches sent by ``run``, the running first
        self._backlog: collections.deque[Batch] = collections.deque()  # batches of ``run`` waiting for a worker
        self._stopping: set[asyncio.Task[Any]] = set()  # workers stopped in the background
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

    # The batcher's side: place a batch.

    async def wait_idle(self) -> None:
        """Return once a worker is idle; raises ``ServiceUnavailableError`` while ``unavailable`` and none is."""
        while not self._idle:
            if (reason := self.unavailable()) is not None:
                raise ServiceUnavailableError(reason)
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._idle_waiters.append(waiter)
            await waiter

    def room(self, overloaded: bool = False) -> bool:
        """Whether ``run`` sends a batch at once: a worker is idle, or a busy one has room in its pipeline (deeper when
        ``overloaded``), and no batch waits for a worker."""
        return self.slots(overloaded) > 0

    def slots(self, overloaded: bool = False) -> int:
        """How many batches ``run`` would send at once, one after another: to the idle workers and into the pipelines
        of the busy ones, as many as they have room for; none while a batch waits for a worker."""
        if self._backlog:
            return 0
        if self.closed or self._urgent:  # no pipeline takes more
            return len(self._idle)
        depth = self._depth(overloaded)
        free = len(self._idle) * depth
        for worker, line in self._lines.items():  # a loop, not sum(): under overload this runs for every head read
            if len(line) < depth and not worker.retiring:
                free += depth - len(line)
        return free

    def _place(self, batch: Batch) -> None:
        """Send ``batch`` to an idle worker, else into the pipeline of a busy one; else it waits for a worker, after
        the batches already waiting (``_next``, ``release``), or fails while ``unavailable``."""
        worker = None if self._backlog else self._idle.popleft() if self._idle else self._pipeline(batch.overloaded)
        if worker is not None:
            self._hand(worker, batch)
        elif (reason := self.unavailable()) is not None:
            batch.result.set_exception(ServiceUnavailableError(reason))
        else:
            self._backlog.append(batch)
            batch.result.add_done_callback(lambda _: self._forget(batch))

    def _forget(self, batch: Batch) -> None:
        """A batch waiting for a worker is done (its caller stopped waiting, or it failed): it waits no more."""
        if batch.worker is None:
            with contextlib.suppress(ValueError):
                self._backlog.remove(batch)

    def _pipeline(self, overloaded: bool) -> WorkerProcess | None:
        """The busy worker with the shortest line, if it has room for one more batch in its pipeline (``_depth``) and
        may keep taking batches (``keeps``)."""
        if self.closed or self._urgent:
            return None
        lines = self._lines
        worker = min((w for w in lines if not w.retiring), key=lambda w: len(lines[w]), default=None)
        return worker if worker is not None and len(lines[worker]) < self._depth(overloaded) else None

    def _depth(self, overloaded: bool) -> int:
        """How many batches a busy worker holds: ``PIPELINE``, or when ``overloaded`` as many as make ``PIPELINE_S`` of
        the handler's time (once ``measured``), at most ``MAX_PIPELINE``."""
        return self._deep if overloaded else PIPELINE

    def measured(self, seconds: float) -> None:
        """A batch took the handler ``seconds``: the moving average of its time, and the depth under overload."""
        self.batch_s = seconds if not self.batch_s else 0.9 * self.batch_s + 0.1 * seconds
        self._deep = max(PIPELINE, min(MAX_PIPELINE, math.ceil(PIPELINE_S / self.batch_s)))

    def _hand(self, worker: WorkerProcess, batch: Batch) -> None:
        self.send(worker, batch.requests)
        batch.worker = worker
        line = self._lines.get(worker)
        if line is None:
            line = self._lines[worker] = collections.deque()
            batch.started = time.perf_counter()
            self._read(worker)
        line.append(batch)

    def _read(self, worker: WorkerProcess) -> None:
        """A line was opened for ``worker``: read its results (``WorkerPool`` does)."""
        raise NotImplementedError

    def _next(self, worker: WorkerProcess) -> None:
        """The running batch of ``worker`` was answered: the next one starts (and a batch waiting for a worker takes
        its place in the pipeline), or the worker goes back."""
        line = self._lines[worker]
        line.popleft()
        if line:
            line[0].started = time.perf_counter()
            if self._backlog and len(line) < self._depth(self._backlog[0].overloaded) and self.keeps(worker):
                self._hand(worker, self._backlog.popleft())
        else:
            del self._lines[worker]
            self.release(worker)

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

    def drop(self, worker: WorkerProcess, request_ids: list[str]) -> None:
        """Continuous batching: ask an acquired worker to drop these requests (their clients went away)."""
        worker.send_drop(request_ids)

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

    # Workers leaving, and waiters left without one.

    def _discard(self, worker: WorkerProcess) -> None:
        if worker in self.workers:
            self.workers.remove(worker)
        if worker in self._idle:
            self._idle.remove(worker)

    def _stop(self, stopping: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(stopping)
        self._stopping.add(task)
        task.add_done_callback(self._stopping.discard)

    def _fail_waiters(self, reason: str) -> None:
        """Everyone waiting for a worker fails with ``ServiceUnavailableError(reason)``."""
        waiters: list[asyncio.Future[Any]] = [*self._urgent, *self._waiters, *self._idle_waiters]
        for waiter in waiters + [batch.result for batch in self._backlog]:
            if not waiter.done():
                waiter.set_exception(ServiceUnavailableError(reason))
        self._urgent.clear()
        self._waiters.clear()
        self._idle_waiters.clear()
        self._backlog.clear()


def _hand_to(waiters: collections.deque[asyncio.Future[WorkerProcess]], worker: WorkerProcess) -> bool:
    """Give ``worker`` to the first of ``waiters`` still waiting; whether there was one."""
    while waiters:
        waiter = waiters.popleft()
        if not waiter.done():
            waiter.set_result(worker)
            return True
    return False
