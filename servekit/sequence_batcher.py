"""SequenceBatcher: the front end's side of sequence batching (model-config ``sequenceBatching: true``), TorchServe
0.12's stateful inference.

A sequence is the series of requests that name the same sequence id; which sequence a request joins, and when a
sequence ends, is its ``SequenceTable``'s (``servekit.sequence_table``). The batcher places the sequences on workers
and runs their requests in batches.

Guarantees:

- each sequence is pinned to one worker, which the batcher holds (a lane) while the worker has open sequences, so a
  handler may keep a sequence's state in memory; a new sequence goes to an idle worker when there is one, else to the
  lane with the fewest sequences (among those whose worker the pool lets it keep);
- a sequence has at most one request at its worker: the next is sent once the previous is answered, in the order
  they arrived; a batch holds at most ``batch_size`` requests, each of a different sequence of the lane, the sequence
  whose waiting request is the oldest first;
- ``maxNumSequence`` open sequences at most, as TorchServe 0.12 counts them (its floor of ``batchSize`` x
  ``maxWorkers`` is computed before either is known, from zeros, so it never applies): a new sequence beyond is
  refused 503 (``SequenceLimitError``), as is a request while ``maxSequenceJobQueueSize`` of its sequence wait;
  ``jobQueueSize`` still bounds the requests waiting in all (``QueueFullError``);
- a sequence ends once a request carrying the end header (``ts_request_sequence_end: true``) is answered, when the
  handler names it in that header of an answer (TorchServe's contract), after ``sequenceMaxIdleMSec`` without a
  request waiting or running (0: never), or ``sequenceTimeoutMSec`` after it started (0: never; requests already
  waiting then still run). A later request naming it gets the 404, which says why;
- a worker that dies (or misses ``responseTimeout``) fails the batch it ran with the pool's error and the waiting
  requests of its sequences with ``WorkerDiedError``; those sequences end and the pool replaces the worker. A death
  is noticed when the lane next runs a batch on the worker.

The pool is held behind ``_request_worker``, ``_keeps``, ``_run_on`` and ``_give_back``, the only places this module
calls it. Runs in the front-end process; never imports the pool.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any, Protocol, TypeVar

from servekit.batcher import Batcher, BatchObserver, Pending, Workers
from servekit.errors import ServekitError, ServiceUnavailableError, WorkerDiedError
from servekit.protocol import BatchResult, Failure, Request, Response
from servekit.sequence import SequencePolicy
from servekit.sequence_table import Lane, OpenSequence, SequenceTable

W = TypeVar("W")


class PinnedWorkers(Workers[W], Protocol[W]):
    """What sequence batching needs from a pool of workers, besides what the ``Batcher`` needs."""

    def acquire(self) -> asyncio.Future[W]: ...


class SequenceBatcher(Batcher[W]):
    """Queue the requests of one model version by sequence and batch them on the sequences' workers."""

    def __init__(
        self,
        model: str,
        workers: PinnedWorkers[W],
        batch_size: int,
        queue_size: int,
        observer: BatchObserver,
        policy: SequencePolicy,
    ) -> None:
        self.policy = policy
        self._pool = workers
        self._keys = policy.keys
        self._sequences: SequenceTable[W] = SequenceTable(
            model, policy, self._unpin, functools.partial(Batcher._drop, self)
        )
        self._unplaced: collections.deque[OpenSequence[W]] = collections.deque()  # waiting for a lane
        self._lanes: list[Lane[W]] = []
        self._lane_tasks: set[asyncio.Task[None]] = set()
        self._waiter: asyncio.Future[W] | None = None  # the batcher's one request for a worker of the pool
        super().__init__(model, workers, batch_size, queue_size, observer)

    @property
    def sequences(self) -> int:
        """Open sequences."""
        return len(self._sequences)

    async def submit(
        self, request: Request, timeout_s: float | None = None, hooks: set[Callable[[], Any]] | None = None
    ) -> Response:
        """Queue one request in its sequence (a new one without a sequence id) and wait for its answer, which carries
        the sequence id header. Raises ``SequenceNotFoundError`` or ``SequenceLimitError`` before queueing, and as
        ``Batcher.submit`` the error that failed it, ``DeadlineExceededError`` after ``timeout_s`` queued, and
        ``ClientDisconnectedError`` when a hook fires."""
        refusal = self.refusal()
        if refusal is not None:
            raise refusal
        sequence, request = self._sequences.admit(request)
        pending = Pending(request, asyncio.get_running_loop().create_future(), time.perf_counter())
        self._queue.append(pending)
        sequence.queue.append(pending)
        if sequence.timer is not None:
            sequence.timer.cancel()
            sequence.timer = None
        if sequence.lane is not None:
            sequence.lane.wake.set()
        elif sequence not in self._unplaced:
            self._unplaced.append(sequence)
            self._arrival.set()
        response = await self._response(pending, timeout_s, hooks)
        if self._keys.sequence_id(response.headers) is None:
            response = replace(response, headers={**response.headers, self._keys.id: sequence.id})
        return response

    def _drop(self, pending: Pending) -> None:
        super()._drop(pending)
        sequence = self._sequences.get(self._keys.sequence_id(pending.request.headers) or "")
        if sequence is not None:
            with contextlib.suppress(ValueError):
                sequence.queue.remove(pending)
            self._sequences.settle(sequence)

    def _unpin(self, sequence: OpenSequence[W]) -> None:
        """An ended sequence leaves its lane, or the sequences waiting for one."""
        if sequence.lane is not None:
            sequence.lane.sequences.remove(sequence)
            sequence.lane.wake.set()
        else:
            with contextlib.suppress(ValueError):
                self._unplaced.remove(sequence)

    async def _dispatch(self) -> None:
        """Pin each new sequence to a lane."""
        while True:
            await self._arrived(self._unplaced)
            lane = await self._lane()
            if lane is None:
                continue
            if self._unplaced:
                self._pin(self._unplaced.popleft(), lane)
            elif lane.task is None:  # a new lane, and the sequences ended while it waited for a worker
                self._close(lane)
                self._give_back(lane.worker)

    def _pin(self, sequence: OpenSequence[W], lane: Lane[W]) -> None:
        sequence.lane = lane
        lane.sequences.append(sequence)
        lane.wake.set()
        if lane.task is None:
            lane.task = asyncio.get_running_loop().create_task(self._serve(lane))
            self._lane_tasks.add(lane.task)
            lane.task.add_done_callback(self._lane_tasks.discard)
        self._sequences.settle(sequence)

    async def _lane(self) -> Lane[W] | None:
        """A new lane when a worker is idle, else the one with the fewest sequences; ``None`` after waiting for a
        worker (the caller looks again)."""
        if self._waiter is None:
            self._waiter = self._request_worker()
        waiter = self._waiter
        if not waiter.done():
            lane = self._least_loaded()
            if lane is not None:
                return lane  # the request for a worker stays: the next idle worker opens a lane
            await asyncio.wait([waiter])
            if self._waiter is not waiter:
                return None
        self._waiter = None
        try:
            worker = waiter.result()
        except ServiceUnavailableError as exc:
            lane = self._least_loaded()
            if lane is not None:
                return lane
            error = ServiceUnavailableError(f'Model "{self.model}" {exc.message}')
            for sequence in list(self._unplaced):
                self._sequences.discard(sequence)  # never ran: its id may start a sequence again
                self._end_unplaced(sequence, error)
            return None
        opened: Lane[W] = Lane(worker)
        self._lanes.append(opened)
        return opened

    def _least_loaded(self) -> Lane[W] | None:
        open_lanes = [lane for lane in self._lanes if self._keeps(lane.worker)]
        return min(open_lanes, key=lambda lane: len(lane.sequences), default=None)

    def _end_unplaced(self, sequence: OpenSequence[W], error: ServekitError) -> None:
        with contextlib.suppress(ValueError):
            self._unplaced.remove(sequence)
        if sequence.timer is not None:
            sequence.timer.cancel()
        self._fail(list(sequence.queue), error)
        for pending in sequence.queue:
            super()._drop(pending)
        sequence.queue.clear()

    def _on_worker(self, waiter: asyncio.Future[W]) -> None:
        """A worker given while no sequence waits for a lane goes back at once."""
        if waiter.cancelled() or waiter.exception() is not None:  # the dispatcher reads the error
            return
        if not self._unplaced and self._waiter is waiter:
            self._waiter = None
            self._give_back(waiter.result())

    async def _serve(self, lane: Lane[W]) -> None:
        """Run the lane's batches while it has sequences; then its worker goes back to the pool."""
        while lane.sequences:
            batch = self._heads(lane)
            if not batch:
                lane.wake.clear()
                await lane.wake.wait()
                continue
            lane.batch = [pending for _, pending in batch]
            sent = time.perf_counter()
            try:
                result = await self._run_on(lane.worker, lane.batch)
            except ServekitError as exc:
                self._lose(lane, exc)
                return  # the pool replaces the worker
            self._answer(lane.batch, result, (time.perf_counter() - sent) * 1000)
            lane.batch = []
            self._after(batch, result)
        self._close(lane)
        self._give_back(lane.worker)

    def _heads(self, lane: Lane[W]) -> list[tuple[OpenSequence[W], Pending]]:
        """The next request of up to ``batch_size`` of the lane's sequences, the longest waiting first."""
        ready = sorted((s for s in lane.sequences if s.queue), key=lambda s: s.queue[0].arrival)
        batch = []
        now = time.perf_counter()
        for sequence in ready[: self.batch_size]:
            pending = sequence.queue.popleft()
            super()._drop(pending)
            sequence.running = True
            batch.append((sequence, pending))
            self._observer.queued(now - pending.arrival)
        return batch

    def _after(self, batch: list[tuple[OpenSequence[W], Pending]], result: BatchResult) -> None:
        """After a batch: the sequences that the handler closed end, the others settle."""
        closed: set[str] = set()
        if not isinstance(result.outcome, Failure):
            for (sequence, _), response in zip(batch, result.outcome, strict=True):
                named = self._keys.ended_by(response.headers)
                if named is not None:
                    closed |= (named & self._sequences.ids()) or {sequence.id}
        now = time.monotonic()
        for sequence, _ in batch:
            sequence.running, sequence.last = False, now
        reason = f"is closed: the handler ended it ({self._keys.end} in its answer)"
        for sequence_id in closed:
            ended = self._sequences.get(sequence_id)
            if ended is not None:
                self._sequences.end(ended, reason)
        for sequence, _ in batch:
            self._sequences.settle(sequence)

    def _lose(self, lane: Lane[W], exc: ServekitError) -> None:
        """The lane's worker died: its batch fails with the pool's error, its sequences end."""
        self._close(lane)
        self._fail(lane.batch, exc)
        reason = f"ended when its worker died: {exc.message}"
        for sequence in list(lane.sequences):
            sequence.running = False
            error = WorkerDiedError(f'Sequence "{sequence.id}" of model "{self.model}" {reason}')
            self._sequences.end(sequence, reason, error)

    def _close(self, lane: Lane[W]) -> None:
        with contextlib.suppress(ValueError):
            self._lanes.remove(lane)

    # The pool, held behind these four (the batcher/pool boundary is being reshaped: keep its calls here).

    def _request_worker(self) -> asyncio.Future[W]:
        waiter = self._pool.acquire()
        waiter.add_done_callback(self._on_worker)
        return waiter

    def _keeps(self, worker: W) -> bool:
        return self._pool.keeps(worker)

    async def _run_on(self, worker: W, batch: list[Pending]) -> BatchResult:
        self._pool.send(worker, [pending.request for pending in batch])
        return await self._pool.collect(worker, len(batch), functools.partial(self._stream, batch))

    def _give_back(self, worker: W) -> None:
        self._pool.release(worker)

    async def close(self, timeout: float) -> None:
        """Stop admitting; let waiting and running requests finish for up to ``timeout`` seconds; then end every
        sequence, failing what still waits with 503. Lanes give their workers back once their batch is done."""
        self._closed = True
        deadline = time.monotonic() + timeout
        while (self._queue or any(lane.batch for lane in self._lanes)) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        error = ServiceUnavailableError(f'Model "{self.model}" was unregistered')
        for sequence in self._sequences.open_sequences():
            self._sequences.end(sequence, "ended: its model was unregistered", error)
        self._fail_queued(error)
        self._dispatcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._dispatcher
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.cancel() and not waiter.cancelled() and waiter.exception() is None:
            self._give_back(waiter.result())  # given, never taken
