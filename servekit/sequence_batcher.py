"""SequenceBatcher: the front end's side of sequence batching (model-config ``sequenceBatching: true``), TorchServe
0.12's stateful inference.

A sequence is the series of requests that name the same sequence id, in the ``ts_request_sequence_id`` header (or the
one ``ts_header_key_sequence_id`` names). A request without one starts a sequence, whose id, ``ts-seq-<uuid>``, comes
back in that response header (every answer of a sequence carries it). A request naming an id that is not open starts
a sequence of that id, as TorchServe's clients may choose their ids, unless this server ended that sequence (closed,
expired, lost with its worker: the latest ``REMEMBERED`` ended ids are kept) or the id has the server's own
``ts-seq-`` form: then it is answered 404 (``SequenceNotFoundError``), never run.

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
import math
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Generic, Protocol, TypeVar

from servekit.batcher import Batcher, BatchObserver, Pending, Workers
from servekit.errors import (
    BadRequestError,
    SequenceLimitError,
    SequenceNotFoundError,
    ServekitError,
    ServiceUnavailableError,
    WorkerDiedError,
)
from servekit.protocol import BatchResult, Failure, Request, Response

W = TypeVar("W")
ID_PREFIX = "ts-seq-"  # the ids the server makes, as TorchServe makes them
REMEMBERED = 10_000  # ended sequences whose ids are answered 404 (the latest, per model)
UNKNOWN = "is unknown: this server did not start it, or ended it long ago"
DEFAULT_ID = "ts_request_sequence_id"  # TorchServe's header names, which its handlers read through the context
DEFAULT_START = "ts_request_sequence_start"
DEFAULT_END = "ts_request_sequence_end"


class PinnedWorkers(Workers[W], Protocol[W]):
    """What sequence batching needs from a pool of workers, besides what the ``Batcher`` needs."""

    def acquire(self) -> asyncio.Future[W]: ...


@dataclass(frozen=True, slots=True)
class SequenceKeys:
    """The header names of sequence batching (config.properties ``ts_header_key_sequence_*``)."""

    id: str = DEFAULT_ID
    start: str = DEFAULT_START
    end: str = DEFAULT_END


@dataclass(frozen=True, slots=True)
class SequencePolicy:
    """A model's sequence settings, from its model-config YAML."""

    max_idle_ms: int = 0
    timeout_ms: int = 0
    max_queue: int = 1
    max_sequences: int = 1
    keys: SequenceKeys = field(default_factory=SequenceKeys)


DEFAULT_KEYS = SequenceKeys()


def sequence_batching(model_yaml_config: Mapping[str, Any]) -> bool:
    """Whether the model config says ``sequenceBatching: true`` (a YAML boolean, as TorchServe reads it)."""
    return model_yaml_config.get("sequenceBatching") is True


def sequence_policy(config: Mapping[str, Any], keys: SequenceKeys = DEFAULT_KEYS) -> SequencePolicy:
    """The policy of a model config; ``BadRequestError`` for a value that is not an integer in range."""

    def number(key: str, default: int, minimum: int) -> int:
        value = config.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise BadRequestError(f"model config: {key} must be an integer of at least {minimum}, got {value!r}")
        return value

    return SequencePolicy(
        max_idle_ms=number("sequenceMaxIdleMSec", 0, 0),
        timeout_ms=number("sequenceTimeoutMSec", 0, 0),
        max_queue=number("maxSequenceJobQueueSize", 1, 1),
        max_sequences=number("maxNumSequence", 1, 1),
        keys=keys,
    )


@dataclass(eq=False)
class Lane(Generic[W]):
    """A worker held by the batcher and the sequences pinned to it."""

    worker: W
    sequences: list[OpenSequence[W]] = field(default_factory=list)
    wake: asyncio.Event = field(default_factory=asyncio.Event)  # a pinned sequence has a request, or one ended
    batch: list[Pending] = field(default_factory=list)  # sent to the worker, not yet answered
    task: asyncio.Task[None] | None = None  # runs its batches, from its first sequence on


@dataclass(eq=False)
class OpenSequence(Generic[W]):
    """A sequence: its waiting requests, its lane once pinned, and its clocks (``time.monotonic``)."""

    id: str
    started: float
    last: float  # its last request's answer, or its start
    queue: collections.deque[Pending] = field(default_factory=collections.deque)
    lane: Lane[W] | None = None
    running: bool = False
    closing: bool = False  # its last request has arrived: it takes no more
    timer: asyncio.TimerHandle | None = None


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
        self._sequences: dict[str, OpenSequence[W]] = {}
        self._ended: collections.OrderedDict[str, str] = collections.OrderedDict()  # id -> why, the latest
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
        sequence, request = self._admit(request)
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
        if _header(response.headers, self._keys.id) is None:
            response = replace(response, headers={**response.headers, self._keys.id: sequence.id})
        return response

    def _admit(self, request: Request) -> tuple[OpenSequence[W], Request]:
        """The request's sequence, opened if new, and the request with the headers the handler sees."""
        keys, now = self._keys, time.monotonic()
        sequence_id = _header(request.headers, keys.id)
        sequence = self._sequences.get(sequence_id) if sequence_id else None
        if sequence is None:
            if sequence_id:
                reason = self._ended.get(sequence_id) or (UNKNOWN if sequence_id.startswith(ID_PREFIX) else None)
                if reason is not None:
                    raise SequenceNotFoundError(self.model, sequence_id, reason)
            sequence = self._open(sequence_id or f"{ID_PREFIX}{uuid.uuid4()}", now)
            headers = _named(keys.start, "true", DEFAULT_START)
        elif sequence.closing:
            raise SequenceNotFoundError(self.model, sequence.id, self._closed_reason(keys.end))
        elif self.policy.timeout_ms and now >= sequence.started + self.policy.timeout_ms / 1000:
            reason = self._expiry_reason(lifetime=True)
            if not sequence.running and not sequence.queue:
                self._end(sequence, reason)
            raise SequenceNotFoundError(self.model, sequence.id, reason)
        elif len(sequence.queue) >= self.policy.max_queue:
            waiting = f"{len(sequence.queue)} requests of sequence {sequence.id} waiting"
            raise SequenceLimitError(self.model, f"{waiting}, maxSequenceJobQueueSize={self.policy.max_queue}")
        else:
            headers = {}
        if (_header(request.headers, keys.end) or "").strip().lower() == "true":
            sequence.closing = True
            headers |= _named(keys.end, "true", DEFAULT_END)
        headers |= _named(keys.id, sequence.id, DEFAULT_ID)
        kept = {name: value for name, value in request.headers.items() if name.lower() not in headers}
        return sequence, replace(request, headers=kept | headers)

    def _open(self, sequence_id: str, now: float) -> OpenSequence[W]:
        if len(self._sequences) >= self.policy.max_sequences:
            opened = f"{len(self._sequences)} sequences open, maxNumSequence={self.policy.max_sequences}"
            raise SequenceLimitError(self.model, opened)
        sequence: OpenSequence[W] = OpenSequence(sequence_id, now, now)
        self._sequences[sequence_id] = sequence
        return sequence

    def _closed_reason(self, key: str) -> str:
        return f"is closed: a request with {key}: true ended it"

    def _expiry_reason(self, lifetime: bool) -> str:
        if lifetime:
            return f"expired: sequenceTimeoutMSec={self.policy.timeout_ms} ms have passed since it started"
        return f"expired: no request for sequenceMaxIdleMSec={self.policy.max_idle_ms} ms"

    def _drop(self, pending: Pending) -> None:
        super()._drop(pending)
        sequence = self._sequences.get(_header(pending.request.headers, self._keys.id) or "")
        if sequence is not None:
            with contextlib.suppress(ValueError):
                sequence.queue.remove(pending)
            self._settle(sequence)

    def _settle(self, sequence: OpenSequence[W]) -> None:
        """A sequence with nothing waiting or running: ended if its last request came, else its expiry scheduled."""
        if self._sequences.get(sequence.id) is not sequence or sequence.running or sequence.queue:
            return
        if sequence.closing:
            self._end(sequence, self._closed_reason(self._keys.end))
            return
        deadline = math.inf
        if self.policy.max_idle_ms:
            deadline = sequence.last + self.policy.max_idle_ms / 1000
        if self.policy.timeout_ms:
            deadline = min(deadline, sequence.started + self.policy.timeout_ms / 1000)
        if deadline == math.inf:
            return
        if sequence.timer is not None:
            sequence.timer.cancel()
        delay = max(0.0, deadline - time.monotonic())
        sequence.timer = asyncio.get_running_loop().call_later(delay, self._idle_out, sequence)

    def _idle_out(self, sequence: OpenSequence[W]) -> None:
        sequence.timer = None
        if sequence.running or sequence.queue:
            return
        lifetime = bool(self.policy.timeout_ms) and (
            time.monotonic() >= sequence.started + self.policy.timeout_ms / 1000 - 0.001
        )
        self._end(sequence, self._expiry_reason(lifetime))

    def _end(self, sequence: OpenSequence[W], reason: str, error: ServekitError | None = None) -> None:
        """Forget an open sequence (its id is then answered 404 with ``reason``); its waiting requests fail with
        ``error``, by default that 404. A request of it that is running is answered as usual."""
        if self._sequences.get(sequence.id) is not sequence:
            return
        del self._sequences[sequence.id]
        self._ended[sequence.id] = reason
        while len(self._ended) > REMEMBERED:
            self._ended.popitem(last=False)
        if sequence.timer is not None:
            sequence.timer.cancel()
        sequence.closing = True
        if sequence.lane is not None:
            sequence.lane.sequences.remove(sequence)
            sequence.lane.wake.set()
        else:
            with contextlib.suppress(ValueError):
                self._unplaced.remove(sequence)
        failure = error or SequenceNotFoundError(self.model, sequence.id, reason)
        while sequence.queue:
            pending = sequence.queue.popleft()
            super()._drop(pending)
            if not pending.future.done():
                pending.future.set_exception(failure)

    async def _dispatch(self) -> None:
        """Pin each new sequence to a lane."""
        while True:
            if not self._unplaced:
                self._arrival.clear()
                await self._arrival.wait()
                continue
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
        self._settle(sequence)

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
                self._sequences.pop(sequence.id, None)  # never ran: its id may start a sequence again
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
                value = _header(response.headers, self._keys.end) or _header(response.headers, DEFAULT_END)
                if value is not None:
                    named = {name.strip() for name in value.split(";")} & self._sequences.keys()
                    closed |= named or {sequence.id}
        now = time.monotonic()
        for sequence, _ in batch:
            sequence.running, sequence.last = False, now
        reason = f"is closed: the handler ended it ({self._keys.end} in its answer)"
        for sequence_id in closed:
            if sequence_id in self._sequences:
                self._end(self._sequences[sequence_id], reason)
        for sequence, _ in batch:
            self._settle(sequence)

    def _lose(self, lane: Lane[W], exc: ServekitError) -> None:
        """The lane's worker died: its batch fails with the pool's error, its sequences end."""
        self._close(lane)
        self._fail(lane.batch, exc)
        reason = f"ended when its worker died: {exc.message}"
        for sequence in list(lane.sequences):
            sequence.running = False
            error = WorkerDiedError(f'Sequence "{sequence.id}" of model "{self.model}" {reason}')
            self._end(sequence, reason, error)

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
        for sequence in list(self._sequences.values()):
            self._end(sequence, "ended: its model was unregistered", error)
        self._fail_queued(error)
        self._dispatcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._dispatcher
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.cancel() and not waiter.cancelled() and waiter.exception() is None:
            self._give_back(waiter.result())  # given, never taken


def _header(headers: Mapping[str, str], name: str) -> str | None:
    """A header by name in any case (the HTTP layer passes lower-case names; a handler sets its own)."""
    value = headers.get(name)
    if value is None:
        lowered = name.lower()
        value = next((v for k, v in headers.items() if k.lower() == lowered), None)
    return value


def _named(key: str, value: str, default: str) -> dict[str, str]:
    """``value`` under ``key`` (lower case, as the HTTP layer passes names), and under TorchServe's default name,
    which the handler's context reads, when ``key`` is another."""
    return {key.lower(): value, default: value}
