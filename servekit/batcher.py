"""Batcher: one bounded queue per model version that turns requests into batches.

A batch leaves as soon as a worker is free and requests are waiting, holding at most ``batch_size``
of them: while every worker is busy, arrivals pile up and the next free worker takes up to
``batch_size`` at once, so batches grow with load; a lone request with an idle worker is sent at
once (it never waits out a batch window). ``max_batch_delay`` is therefore only an upper bound on the
time a request waits for companions, which this policy keeps at zero.
A request whose caller went away (client disconnect, cancelled task) or whose deadline passed while it was
queued is dropped before it reaches a worker and frees its slot. Every admitted request is answered exactly
once: with its response, or with the error that failed it.

The batcher does not know about processes: the registry passes in the model's ``Workers`` (the
pool). Runs in the front-end process; never imports the pool.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
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
PIPELINE = 2  # batches a busy worker holds while requests wait: the one it runs and the next


class Workers(Protocol[W]):
    """What the batcher needs from a pool of workers."""

    def unavailable(self) -> str | None:
        """Why no request can be served now (no workers, crash loop), or ``None``."""

    def acquire(self) -> Awaitable[W]: ...

    def release(self, worker: W) -> None: ...

    def send(self, worker: W, requests: list[Request]) -> None:
        """Hand an acquired worker a batch."""

    async def collect(
        self, worker: W, n_requests: int, on_chunks: Callable[[list[tuple[int, Response]]], None]
    ) -> BatchResult:
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


async def _rest(chunks: asyncio.Queue[bytes | ServekitError | None]) -> AsyncIterator[bytes]:
    """The chunks of a streamed response after its first: up to ``None``; an error ends the stream with it."""
    while (chunk := await chunks.get()) is not None:
        if isinstance(chunk, ServekitError):
            raise chunk
        yield chunk


class Batcher(Generic[W]):
    """Queue, batch and dispatch the requests of one model version."""

    def __init__(
        self, model: str, workers: Workers[W], batch_size: int, queue_size: int, observer: BatchObserver
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
        self._refusal = ""
        self._dispatcher = asyncio.get_running_loop().create_task(self._dispatch())

    @property
    def depth(self) -> int:
        """Requests waiting for a worker."""
        return len(self._queue)

    def refusal(self) -> ServiceUnavailableError | None:
        """Why a request is refused now (unregistering, no worker, queue full), or ``None`` if it would be queued:
        known before a request's body is read, so that the excess is refused cheaply. Refusals are logged here, one
        line per second (under overload there are thousands a second; each still has its access-log line)."""
        if self._closed:
            error = ServiceUnavailableError(f'Model "{self.model}" is being unregistered')
        elif (reason := self._workers.unavailable()) is not None:
            error = ServiceUnavailableError(f'Model "{self.model}" {reason}')
        elif len(self._queue) >= self.queue_size:
            error = QueueFullError(self.model, self.queue_size)
        else:
            return None
        if not self._refused:
            asyncio.get_running_loop().call_later(REFUSAL_LOG_S, self._log_refusals)
        self._refused += 1
        self._refusal = error.message
        error.logged = True
        return error

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
        refusal = self.refusal()
        if refusal is not None:
            raise refusal
        loop = asyncio.get_running_loop()
        pending = Pending(request, loop.create_future(), time.perf_counter())
        self._queue.append(pending)
        self._arrival.set()
        timer = loop.call_later(timeout_s, self._expire, pending, timeout_s) if timeout_s is not None else None
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

    async def _dispatch(self) -> None:
        while True:
            if not self._queue:
                self._arrival.clear()
                await self._arrival.wait()
                continue
            try:
                worker = await self._workers.acquire()
            except ServiceUnavailableError as exc:
                self._fail_queued(ServiceUnavailableError(f'Model "{self.model}" {exc.message}'))
                continue
            batch = self._take_batch()
            if not batch:
                self._workers.release(worker)
                continue
            task = asyncio.get_running_loop().create_task(self._execute(worker, batch))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

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

    async def _execute(self, worker: W, batch: list[Pending]) -> None:
        """Run ``batch`` on ``worker``, then the next batches while requests wait, without a round through the
        dispatcher. While requests wait, the worker holds ``PIPELINE`` batches: the one it runs and the next, sent
        before the first one's result is read, so that it starts the next the moment it is done, however busy the
        event loop is (under overload one turn of the loop can outlast a batch: issue 13). Batches queued behind the
        one that lost the worker never ran: they go back to the head of the queue."""
        sent = time.perf_counter()
        inflight = collections.deque([(batch, sent)])
        self._workers.send(worker, [p.request for p in batch])
        while inflight:
            self._refill(worker, inflight)
            head, sent = inflight[0]
            try:
                result = await self._workers.collect(worker, len(head), functools.partial(self._stream, head))
            except ServekitError as exc:
                self._fail(head, exc)
                for later, _ in list(inflight)[1:]:
                    self._requeue(later)
                return  # the pool replaces the worker
            done = time.perf_counter()
            inflight.popleft()
            if inflight:  # the next batch started when this one ended, not when it was sent
                inflight[0] = (inflight[0][0], done)
            self._refill(worker, inflight)  # before this batch's responses are written
            self._answer(head, result, (done - sent) * 1000)
        self._workers.release(worker)

    def _refill(self, worker: W, inflight: collections.deque[tuple[list[Pending], float]]) -> None:
        while len(inflight) < PIPELINE and self._queue and self._workers.keeps(worker):
            batch = self._take_batch()
            if not batch:
                return
            self._workers.send(worker, [p.request for p in batch])
            inflight.append((batch, time.perf_counter()))

    def _requeue(self, batch: list[Pending]) -> None:
        if self._dispatcher.done():  # closed (unregistered): nothing would take them from the queue again
            self._fail(batch, ServiceUnavailableError(f'Model "{self.model}" was unregistered'))
            return
        for pending in reversed(batch):
            if not pending.future.done():
                self._queue.appendleft(pending)
        self._arrival.set()

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
                pending.future.set_result(replace(response, more=_rest(pending.chunks)))

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
