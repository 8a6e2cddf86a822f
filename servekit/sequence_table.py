"""SequenceTable: the sequences of one model version under sequence batching, apart from the workers they run on.

A sequence is the series of requests that name the same sequence id, in the ``ts_request_sequence_id`` header (or the
one ``ts_header_key_sequence_id`` names). A request without one starts a sequence, whose id, ``ts-seq-<uuid>``, comes
back in that response header (every answer of a sequence carries it). A request naming an id that is not open starts
a sequence of that id, as TorchServe's clients may choose their ids, unless this server ended that sequence (closed,
expired, lost with its worker: the latest ``REMEMBERED`` ended ids are kept) or the id has the server's own
``ts-seq-`` form: then it is answered 404 (``SequenceNotFoundError``), never run.

The table admits requests to their sequences (``admit``), holds each open sequence's waiting requests and clocks, and
ends sequences: once their last request is answered, when they idle out or outlive ``sequenceTimeoutMSec``
(``settle``), or when the batcher ends them (``end``). Which worker a sequence runs on (its ``Lane``) is the
batcher's (``servekit.sequence_batcher``): the table calls ``unpin`` when a sequence ends, and ``unqueue`` for each
waiting request it fails. Runs in the front-end process; never imports the pool.
"""

from __future__ import annotations

import asyncio
import collections
import math
import time
import uuid
from collections.abc import Callable, KeysView
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from servekit.batcher import Pending
from servekit.errors import SequenceLimitError, SequenceNotFoundError, ServekitError
from servekit.protocol import Request
from servekit.sequence import SequencePolicy

W = TypeVar("W")
ID_PREFIX = "ts-seq-"  # the ids the server makes, as TorchServe makes them
REMEMBERED = 10_000  # ended sequences whose ids are answered 404 (the latest, per model)
UNKNOWN = "is unknown: this server did not start it, or ended it long ago"


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


class SequenceTable(Generic[W]):
    """The open sequences of one model version by id, and the ids of the latest ended ones with why."""

    def __init__(
        self,
        model: str,
        policy: SequencePolicy,
        unpin: Callable[[OpenSequence[W]], None],
        unqueue: Callable[[Pending], None],
    ) -> None:
        self.model = model
        self.policy = policy
        self._unpin = unpin  # an ended sequence leaves its lane, or the sequences waiting for one
        self._unqueue = unqueue  # a failed waiting request leaves the model's queue
        self._sequences: dict[str, OpenSequence[W]] = {}
        self._ended: collections.OrderedDict[str, str] = collections.OrderedDict()  # id -> why, the latest

    def __len__(self) -> int:
        return len(self._sequences)

    def get(self, sequence_id: str) -> OpenSequence[W] | None:
        """The open sequence of that id, if any."""
        return self._sequences.get(sequence_id)

    def ids(self) -> KeysView[str]:
        """The ids of the open sequences."""
        return self._sequences.keys()

    def open_sequences(self) -> list[OpenSequence[W]]:
        """The open sequences, as a list that ``end`` does not change."""
        return list(self._sequences.values())

    def discard(self, sequence: OpenSequence[W]) -> None:
        """Forget a sequence that never ran, without remembering its id: the id may start a sequence again."""
        self._sequences.pop(sequence.id, None)

    def admit(self, request: Request) -> tuple[OpenSequence[W], Request]:
        """The request's sequence, opened if new, and the request with the headers the handler sees. Raises
        ``SequenceNotFoundError`` or ``SequenceLimitError`` instead when the request may not join it."""
        keys, now = self.policy.keys, time.monotonic()
        sequence_id = keys.sequence_id(request.headers)
        sequence = self._sequences.get(sequence_id) if sequence_id else None
        start = sequence is None
        if sequence is None:
            if sequence_id:
                reason = self._ended.get(sequence_id) or (UNKNOWN if sequence_id.startswith(ID_PREFIX) else None)
                if reason is not None:
                    raise SequenceNotFoundError(self.model, sequence_id, reason)
            sequence = self._open(sequence_id or f"{ID_PREFIX}{uuid.uuid4()}", now)
        elif sequence.closing:
            raise SequenceNotFoundError(self.model, sequence.id, self._closed_reason())
        elif self.policy.outlived(sequence.started, now):
            reason = self.policy.expiry_reason(lifetime=True)
            if not sequence.running and not sequence.queue:
                self.end(sequence, reason)
            raise SequenceNotFoundError(self.model, sequence.id, reason)
        elif len(sequence.queue) >= self.policy.max_queue:
            waiting = f"{len(sequence.queue)} requests of sequence {sequence.id} waiting"
            raise SequenceLimitError(self.model, f"{waiting}, maxSequenceJobQueueSize={self.policy.max_queue}")
        end = keys.ends(request.headers)
        if end:
            sequence.closing = True
        return sequence, keys.for_handler(request, sequence.id, start, end)

    def _open(self, sequence_id: str, now: float) -> OpenSequence[W]:
        if len(self._sequences) >= self.policy.max_sequences:
            opened = f"{len(self._sequences)} sequences open, maxNumSequence={self.policy.max_sequences}"
            raise SequenceLimitError(self.model, opened)
        sequence: OpenSequence[W] = OpenSequence(sequence_id, now, now)
        self._sequences[sequence_id] = sequence
        return sequence

    def _closed_reason(self) -> str:
        return f"is closed: a request with {self.policy.keys.end}: true ended it"

    def settle(self, sequence: OpenSequence[W]) -> None:
        """A sequence with nothing waiting or running: ended if its last request came, else its expiry scheduled."""
        if self._sequences.get(sequence.id) is not sequence or sequence.running or sequence.queue:
            return
        if sequence.closing:
            self.end(sequence, self._closed_reason())
            return
        deadline = self.policy.deadline(sequence.started, sequence.last)
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
        lifetime = self.policy.outlived(sequence.started, time.monotonic(), slack=0.001)
        self.end(sequence, self.policy.expiry_reason(lifetime))

    def end(self, sequence: OpenSequence[W], reason: str, error: ServekitError | None = None) -> None:
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
        self._unpin(sequence)
        failure = error or SequenceNotFoundError(self.model, sequence.id, reason)
        while sequence.queue:
            pending = sequence.queue.popleft()
            self._unqueue(pending)
            if not pending.future.done():
                pending.future.set_exception(failure)
