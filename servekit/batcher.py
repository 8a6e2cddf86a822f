"""Batcher: one bounded queue per model version that turns requests into batches.

A batch leaves as soon as a worker is free and requests are waiting, holding at most ``batch_size``
of them: while every worker is busy, arrivals pile up and the next free worker takes up to
``batch_size`` at once, so batches grow with load; a lone request with an idle worker is sent at
once (it never waits out a batch window). ``max_batch_delay`` is therefore only an upper bound on the
time a request waits for companions, which this policy keeps at zero.
A request whose caller went away (client disconnect, cancelled task) or whose deadline passed while it was
queued is dropped before it reaches a worker and frees its slot. Every admitted request is answered exactly
once: with its response, or with the error that failed it.

The batcher does not know about processes: the registry passes in the model's pool, which it sees as a
``BatchRunner``: it waits until a worker is idle (``wait_idle``), takes a batch and hands it over with ``run``, one
call that returns the batch's result. Which worker runs it, the pipeline of a busy worker and a worker's death are the
pool's (``servekit.pool``); a batch that fails fails its own requests only. Runs in the front-end process; never
imports the pool.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence, Sized
from dataclasses import dataclass, replace
from typing import Any, Generic, Protocol, TypeVar

from servekit.errors import (
    ClientDisconnectedError,
    DeadlineExceededError,
    HandlerError,
    QueueFullError,
    ServekitError,
    ServiceUnavailableError,
)
from servekit.protocol import BatchResult, Failure, MetricRecord, Request, Response, failure_message

logger = logging.getLogger("servekit.batcher")
W = TypeVar("W")
REFUSAL_LOG_S = 1.0
OnChunks = Callable[[list[tuple[int, Response]]], None]


class BatchRunner(Protocol):
    """What the batcher needs from a pool of workers: the batcher/pool boundary (issue 16)."""

    def unavailable(self) -> str | None:
        """Why no request can be served now (no workers, crash loop), or ``None``."""

    async def wait_idle(self) -> None:
        """Return once a worker is idle; raises ``ServiceUnavailableError`` while ``unavailable`` and none is."""

    def room(self, overloaded: bool = False) -> bool:
        """Whether ``run`` sends a batch at once (a worker is idle, or a busy one has room in its pipeline, which may
        be deeper when ``overloaded``: the batcher refuses requests and holds a full batch)."""

    def slots(self, overloaded: bool = False) -> int:
        """How many batches ``run`` would send at once, one after another (0: no ``room``); more when
        ``overloaded`` for a model whose pipeline then goes deeper."""

    def run(
        self, requests: list[Request], on_chunks: OnChunks, overloaded: bool = False
    ) -> asyncio.Future[BatchResult]:
        """Run a batch (sent before this returns when there is ``room(overloaded)``); the future gives its result,
        with the chunks of streamed responses through ``on_chunks`` as they come, or the ``ServekitError`` that failed
        it (its worker died: ``WorkerDiedError``). Cancelling it drops the batch."""


class Workers(BatchRunner, Protocol[W]):
    """What a batcher that holds workers (continuous and sequence batching: lanes) needs besides."""

    def acquire(self) -> Awaitable[W]: ...

    def release(self, worker: W) -> None: ...

    def send(self, worker: W, requests: list[Request]) -> None:
        """Hand an acquired worker a batch."""

    async def collect(self, worker: W, n_requests: int, on_chunks: OnChunks) -> BatchResult:
        """The result of the batch last sent to ``worker``; raises the ``ServekitError`` that lost the worker."""

    def keeps(self, worker: W) -> bool:
        """Whether ``worker`` may take another batch before it is released."""


class BatchObserver(Protocol):
    """Where the batcher reports queue times and batches (the model's metrics)."""

    def queued(self, seconds: float) -> None: ...

    def batch(self, size: int, handler_ms: float, roundtrip_ms: float, records: Sequence[MetricRecord]) -> None: ...


@dataclass(slots=True)
class Pending:
    request: Request
    future: asyncio.Future[Response]
    arrival: float
    chunks: asyncio.Queue[bytes | ServekitError | None] | None = None  # a streamed response's chunks after the first


async def rest_of_stream(chunks: asyncio.Queue[bytes | ServekitError | None]) -> AsyncIterator[bytes]:
    """The chunks of a streamed response after its first: up to ``None``; an error ends the stream with it."""
    while (chunk := await chunks.get()) is not None:
        if isinstance(chunk, ServekitError):
            raise chunk
        yield chunk


class Batcher(Generic[W]):
    """Queue, batch and dispatch the requests of one model version."""

    def __init__(
        self, model: str, workers: BatchRunner, batch_size: int, queue_size: int, observer: BatchObserver
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.model = model
        self.batch_size = batch_size
        self.queue_size = queue_size
        self._workers = workers
        self._observer = observer
        self._queue: collections.deque[Pending] = collections.deque()
        self._arrival = asyncio.Event()
        self._running: set[asyncio.Task[None]] = set()
        self._closed = False
        self._refused = 0  # refusals since the last log line
        self._promised = 0  # places promised to requests whose heads were read in this turn of the event loop
        self._refusal = ""
        self._dispatcher = asyncio.get_running_loop().create_task(self._dispatch())

    @property
    def depth(self) -> int:
        """Requests waiting for a worker."""
        return len(self._queue)

    def refusal(self, promise: bool = False) -> ServiceUnavailableError | None:
        """Why a request is refused now (unregistering, no worker, queue full), or ``None`` if it would be queued:
        known before a request's body is read, so that the excess is refused cheaply. With ``promise`` (a request's
        head, its body still to read) a request not refused holds a place in the queue until the next turn of the
        event loop, by which time it has been queued unless its body is still on its way: the heads read in one
        turn, which all see the queue as it was before the turn, do not all pass (under overload a turn reads
        hundreds, and those admitted past the queue's room would be refused later, body read). Refusals are logged
        here, one line per second (under overload there are thousands a second; each still has its access-log
        line)."""
        if self._closed:
            error = ServiceUnavailableError(f'Model "{self.model}" is being unregistered')
        elif (reason := self._workers.unavailable()) is not None:
            error = ServiceUnavailableError(f'Model "{self.model}" {reason}')
        elif self._full(promise):
            error = QueueFullError(self.model, self.queue_size)
        else:
            if promise:
                if not self._promised:
                    asyncio.get_running_loop().call_soon(self._forget_promises)  # before the requests' own tasks
                self._promised += 1
            return None
        if not self._refused:
            asyncio.get_running_loop().call_later(REFUSAL_LOG_S, self._log_refusals)
        self._refused += 1
        self._refusal = error.message
        error.logged = True
        return error

    def _full(self, promise: bool) -> bool:
        """Whether the queue has no place for one more request; for a head (``promise``), counting the places
        promised in this turn, and beyond the queue's size the requests that the deeper pipeline takes at once
        (``_beyond_queue``)."""
        if not promise:
            return len(self._queue) >= self.queue_size
        return len(self._queue) + self._promised >= self.queue_size + self._beyond_queue()

    def _beyond_queue(self) -> int:
        """Under overload (refusals in the last second or so), how many requests, in full batches, the deeper pipeline
        of a fast model's workers takes at once beyond the usual one (``BatchRunner.slots``). They start within a
        few milliseconds of handler time, so they need no place in the queue: ``submit`` sends each full batch as it
        is queued, and in a turn of the event loop that reads hundreds of heads the worker's pipeline, not the
        queue alone, bounds what is admitted (issue 13)."""
        if not self._refused:
            return 0
        return (self._workers.slots(True) - self._workers.slots(False)) * self.batch_size

    def _forget_promises(self) -> None:
        self._promised = 0

    def _log_refusals(self) -> None:
        logger.warning(
            "model %s: refused %d requests in %g s: %s", self.model, self._refused, REFUSAL_LOG_S, self._refusal
        )
        self._refused = 0

    async def submit(
        self, request: Request, timeout_s: float | None = None, hooks: set[Callable[[], Any]] | None = None
    ) -> Response:
        """Queue one request and wait for its response; raises the ``ServekitError`` that failed it. With
        ``timeout_s``, a request still queued after that many seconds fails with ``DeadlineExceededError``.
        While it waits, ``hooks`` (the connection's disconnect hooks) hold a callable that drops it: a client
        that goes away gets ``ClientDisconnectedError`` and its request never reaches a worker."""
        pending = self._enqueue(request)
        self._arrival.set()
        if len(self._queue) >= self.batch_size and self._beyond_queue():  # a full batch leaves at once
            self._start()
        return await self._response(pending, timeout_s, hooks)

    def _enqueue(self, request: Request) -> Pending:
        """Queue a request, or raise the ``refusal`` that keeps it out."""
        refusal = self.refusal()
        if refusal is not None:
            raise refusal
        pending = Pending(request, asyncio.get_running_loop().create_future(), time.perf_counter())
        self._queue.append(pending)
        return pending

    async def _response(
        self, pending: Pending, timeout_s: float | None, hooks: set[Callable[[], Any]] | None
    ) -> Response:
        """The response of a queued request, as ``submit`` says: ``DeadlineExceededError`` if still queued after
        ``timeout_s``, ``ClientDisconnectedError`` if a hook drops it first."""
        timer = None
        if timeout_s is not None:
            timer = asyncio.get_running_loop().call_later(timeout_s, self._expire, pending, timeout_s)
        cancel = pending.future.cancel
        if hooks is not None:
            hooks.add(cancel)
        try:
            return await pending.future
        except asyncio.CancelledError:
            self._drop(pending)  # the caller went away: free the slot now
            task = asyncio.current_task()
            if task is None or not task.cancelling():  # the hook fired, not a cancelled task
                raise ClientDisconnectedError("The client disconnected before the response was ready") from None
            raise
        finally:
            if hooks is not None:
                hooks.discard(cancel)
            if timer is not None:
                timer.cancel()

    def _drop(self, pending: Pending) -> None:
        with contextlib.suppress(ValueError):
            self._queue.remove(pending)

    def _expire(self, pending: Pending, timeout_s: float) -> None:
        if pending in self._queue and not pending.future.done():
            self._drop(pending)
            message = f"Request to model {self.model} timed out in queue after {timeout_s * 1000:.0f} ms"
            pending.future.set_exception(DeadlineExceededError(message))

    async def _arrived(self, waiting: Sized) -> None:
        """Return once ``waiting`` (the queue, or what a batcher dispatches from) holds something; ``submit`` sets
        ``_arrival`` when it adds to it."""
        while not waiting:
            self._arrival.clear()
            await self._arrival.wait()

    async def _dispatch(self) -> None:
        while True:
            await self._arrived(self._queue)
            try:
                await self._workers.wait_idle()
            except ServiceUnavailableError as exc:
                self._fail_queued(ServiceUnavailableError(f'Model "{self.model}" {exc.message}'))
                continue
            self._start()

    def _start(self) -> None:
        """Hand the pool batches while requests wait and it takes them at once: to idle workers, then into the
        pipeline of busy ones, so that a worker starts the next batch the moment it is done."""
        while self._queue and self._workers.room(overloaded := self._overloaded()):
            batch = self._take_batch()
            if not batch:
                return
            result = self._workers.run([p.request for p in batch], functools.partial(self._stream, batch), overloaded)
            task = asyncio.get_running_loop().create_task(self._finish(batch, result))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    def _overloaded(self) -> bool:
        """Whether requests were refused in the last second or so and a full batch waits: the pool's pipeline may
        then go deeper."""
        return self._refused > 0 and len(self._queue) >= self.batch_size

    def _take_batch(self, limit: int | None = None) -> list[Pending]:
        """Up to ``limit`` (by default ``batch_size``) requests from the head of the queue, skipping cancelled ones."""
        batch: list[Pending] = []
        now = time.perf_counter()
        limit = self.batch_size if limit is None else limit
        while self._queue and len(batch) < limit:
            pending = self._queue.popleft()
            if not pending.future.done():  # cancelled: the caller went away
                batch.append(pending)
                self._observer.queued(now - pending.arrival)
        return batch

    async def _finish(self, batch: list[Pending], running: Awaitable[BatchResult]) -> None:
        """Answer ``batch`` once its result is in, after handing the pool the next batches (before this one's
        responses are written: issue 13)."""
        try:
            result = await running
        except ServiceUnavailableError as exc:  # no worker was left to run it
            self._fail(batch, ServiceUnavailableError(f'Model "{self.model}" {exc.message}'))
            return
        except ServekitError as exc:
            self._fail(batch, exc)
            return
        self._start()
        self._answer(batch, result, result.roundtrip_ms)

    def _answer(self, batch: list[Pending], result: BatchResult, roundtrip_ms: float) -> None:
        self._observer.batch(len(batch), result.handler_ms, roundtrip_ms, result.metrics)
        outcome = result.outcome
        if isinstance(outcome, Failure):
            if outcome.traceback and outcome.status >= 500:  # the handler's own error: its traceback is the clue
                logger.error(
                    "model %s: the handler failed a batch of %d\n%s", self.model, len(batch), outcome.traceback
                )
            self._fail(batch, HandlerError(failure_message(self.model, outcome), outcome.status))
            return
        for pending, response in zip(batch, outcome, strict=True):
            if pending.chunks is not None:  # a streamed response: its last chunk, then the end
                pending.chunks.put_nowait(response.payload)
                pending.chunks.put_nowait(None)
            elif not pending.future.done():
                pending.future.set_result(response)

    @staticmethod
    def _stream(batch: list[Pending], chunks: list[tuple[int, Response]]) -> None:
        """Chunks of streamed responses: the first answers the request (status, headers, first bytes); the
        others follow through its queue."""
        for index, response in chunks:
            pending = batch[index]
            if pending.chunks is not None:
                pending.chunks.put_nowait(response.payload)
            elif not pending.future.done():
                pending.chunks = asyncio.Queue()
                pending.future.set_result(replace(response, more=rest_of_stream(pending.chunks)))

    @staticmethod
    def _fail(batch: list[Pending], error: ServekitError) -> None:
        for pending in batch:
            if pending.chunks is not None:
                pending.chunks.put_nowait(error)
            elif not pending.future.done():
                pending.future.set_exception(error)

    def _fail_queued(self, error: ServekitError) -> None:
        while self._queue:
            pending = self._queue.popleft()
            if not pending.future.done():
                pending.future.set_exception(error)

    async def close(self, timeout: float) -> None:
        """Stop admitting; let queued and running batches finish for up to ``timeout`` seconds, then
        fail whatever is still queued with 503."""
        self._closed = True
        deadline = time.monotonic() + timeout
        while (self._queue or self._running) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        self._fail_queued(ServiceUnavailableError(f'Model "{self.model}" was unregistered'))
        self._dispatcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._dispatcher
