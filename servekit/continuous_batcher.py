"""ContinuousBatcher: the front end's side of continuous batching (model-config ``continuousBatching: true``).

Each worker the batcher holds is a lane of up to ``batch_size`` requests in flight, which the worker runs iteration by
iteration (``servekit.continuous``), sending back a chunk per request per iteration. A request waits in the queue only
until a lane has room; it is then sent at once and joins the worker's batch at its next iteration. A new lane opens
on an idle worker when there is one (requests spread over the workers), else a request joins the least loaded lane
with room. A lane gives its worker back when its last request has ended, and takes no more requests while the pool
wants the worker back (a retiring worker, a describe request), so those get their turn.

A request's first chunk answers it (status, headers, first bytes) and the others follow through its ``more``; a
request that ends in its first iteration gets a whole answer. A chunk with a status of 400 or more ends the request
with that error (mid-stream, the stream ends with it). A client that goes away (a disconnect hook, a cancelled call,
a stream closed before its end) leaves: the worker is told and drops the request at its next iteration, which frees
its room once the worker confirms. A worker that dies fails the requests it held; queued requests go to other lanes.

Runs in the front-end process; never imports the pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import AsyncIterator, Callable, Collection
from dataclasses import dataclass, field, replace
from typing import Any, Generic, Protocol, TypeVar

import orjson

from servekit.batcher import Batcher, BatchObserver, Pending, Workers, rest_of_stream
from servekit.errors import ClientDisconnectedError, HandlerError, ServekitError, ServiceUnavailableError
from servekit.protocol import Request, Response, Step

W = TypeVar("W")


class Lanes(Workers[W], Protocol[W]):
    """What continuous batching needs from a pool of workers, besides what the ``Batcher`` needs."""

    def acquire(self) -> asyncio.Future[W]: ...

    def drop(self, worker: W, request_ids: list[str]) -> None:
        """Ask an acquired worker to drop these requests at its next iteration."""

    async def step(self, worker: W, running: Collection[str]) -> Step:
        """The next step of an acquired worker; raises the ``ServekitError`` that lost the worker."""


@dataclass(eq=False)
class Lane(Generic[W]):
    """A worker held by the batcher and its requests in flight."""

    worker: W
    running: dict[str, Pending] = field(default_factory=dict)  # by request id: sent, and not yet ended or dropped
    leaving: set[str] = field(default_factory=set)  # asked to drop, not yet confirmed
    closed: bool = False
    last_step: float = field(default_factory=time.perf_counter)


class ContinuousBatcher(Batcher[W]):
    """Queue the requests of one model version and stream them through its workers' running batches."""

    def __init__(
        self, model: str, workers: Lanes[W], batch_size: int, queue_size: int, observer: BatchObserver
    ) -> None:
        self._pool = workers
        self._lanes: list[Lane[W]] = []
        self._room = asyncio.Event()  # a lane has room again (a request ended), or a lane closed
        self._waiter: asyncio.Future[W] | None = None  # the batcher's one request for a worker of the pool
        super().__init__(model, workers, batch_size, queue_size, observer)

    async def submit(
        self, request: Request, timeout_s: float | None = None, hooks: set[Callable[[], Any]] | None = None
    ) -> Response:
        """Queue one request and return its answer once its first chunk is out: a streamed answer's ``more`` gives
        the other chunks as the worker makes them. As in ``Batcher.submit``, a request still queued after
        ``timeout_s`` fails with ``DeadlineExceededError``; ``hooks`` stay on the connection until the stream ends,
        so a client that goes away mid-stream leaves the worker's batch."""
        pending = self._enqueue(request)
        if not self._join_now():
            self._arrival.set()
        loop = asyncio.get_running_loop()
        timer = loop.call_later(timeout_s, self._expire, pending, timeout_s) if timeout_s is not None else None
        leave = functools.partial(self._leave, pending)
        if hooks is not None:
            hooks.add(leave)
        streamed = False
        try:
            response = await pending.future
            if response.more is not None:
                streamed = True
                return replace(response, more=self._follow(pending, response.more, hooks, leave))
            return response
        except asyncio.CancelledError:
            self._leave(pending)
            task = asyncio.current_task()
            if task is None or not task.cancelling():  # the hook fired, not a cancelled task
                raise ClientDisconnectedError("The client disconnected before the response was ready") from None
            raise
        finally:
            if hooks is not None and not streamed:
                hooks.discard(leave)
            if timer is not None:
                timer.cancel()

    async def _follow(
        self,
        pending: Pending,
        rest: AsyncIterator[bytes],
        hooks: set[Callable[[], Any]] | None,
        leave: Callable[[], None],
    ) -> AsyncIterator[bytes]:
        """The chunks after the first; a consumer that stops early (a cancelled gRPC call) drops the request."""
        ended = False
        try:
            async for chunk in rest:
                yield chunk
            ended = True
        finally:
            if hooks is not None:
                hooks.discard(leave)
            if not ended:
                self._drop(pending)

    def _leave(self, pending: Pending) -> None:
        """The client went away: drop its request, queued or running."""
        if not pending.future.done():
            pending.future.cancel()
        self._drop(pending)

    def _drop(self, pending: Pending) -> None:
        super()._drop(pending)
        request_id = pending.request.request_id
        lane = next((lane for lane in self._lanes if request_id in lane.running), None)
        if lane is None or lane.closed or request_id in lane.leaving:
            return
        lane.leaving.add(request_id)
        self._pool.drop(lane.worker, [request_id])
        if pending.chunks is not None:  # a consumer still waiting for chunks (on a closed connection) ends now
            pending.chunks.put_nowait(None)

    async def _dispatch(self) -> None:
        while True:
            await self._arrived(self._queue)
            lane = await self._lane()
            if lane is not None:
                self._join(lane)

    async def _lane(self) -> Lane[W] | None:
        """A lane with room: a new one when a worker is idle, else the least loaded; ``None`` after waiting for
        either (the caller looks again)."""
        if self._waiter is None:
            self._waiter = self._pool.acquire()
            self._waiter.add_done_callback(self._on_worker)
        waiter = self._waiter
        if not waiter.done():
            lane = self._roomiest()
            if lane is not None:
                return lane  # the request for a worker stays: the next idle worker opens a lane
            self._room.clear()
            room = asyncio.ensure_future(self._room.wait())
            either: list[asyncio.Future[Any]] = [waiter, room]
            try:
                await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
            finally:
                room.cancel()
            if not waiter.done() or self._waiter is not waiter:
                return None
        self._waiter = None
        try:
            worker = waiter.result()
        except ServiceUnavailableError as exc:
            lane = self._roomiest()
            if lane is None:
                self._fail_queued(ServiceUnavailableError(f'Model "{self.model}" {exc.message}'))
            return lane
        lane = Lane(worker)
        self._lanes.append(lane)
        return lane

    def _join_now(self) -> bool:
        """Send the queue to a lane with room now, when the dispatcher would (no worker is idle), sparing its turn of
        the event loop: a new request's wait for its first token is what continuous batching shortens."""
        if self._waiter is None or self._waiter.done() or len(self._queue) > 1:
            return False
        lane = self._roomiest()
        if lane is None:
            return False
        self._join(lane)
        return True

    def _on_worker(self, waiter: asyncio.Future[W]) -> None:
        """A worker given while no request waits goes back at once: the batcher asks again when one is needed."""
        if waiter.cancelled() or waiter.exception() is not None:  # the dispatcher reads the error
            return
        if not self._queue and self._waiter is waiter:
            self._waiter = None
            self._pool.release(waiter.result())

    def _roomiest(self) -> Lane[W] | None:
        open_lanes = [
            lane
            for lane in self._lanes
            if not lane.closed and len(lane.running) < self.batch_size and self._pool.keeps(lane.worker)
        ]
        return min(open_lanes, key=lambda lane: len(lane.running), default=None)

    def _join(self, lane: Lane[W]) -> None:
        """Send the lane's worker as many queued requests as it has room for; they join its next iteration."""
        batch = self._take_batch(self.batch_size - len(lane.running))
        if not batch:
            if not lane.running:
                self._close(lane)
                self._pool.release(lane.worker)
            return
        first = not lane.running
        for pending in batch:
            lane.running[pending.request.request_id] = pending
        self._pool.send(lane.worker, [p.request for p in batch])
        if first:
            lane.last_step = time.perf_counter()
            task = asyncio.get_running_loop().create_task(self._read(lane))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _read(self, lane: Lane[W]) -> None:
        """The lane's steps until its last request has ended; then the worker goes back to the pool."""
        try:
            while lane.running:
                step = await self._pool.step(lane.worker, lane.running.keys())
                self._deliver(lane, step)
        except ServekitError as exc:
            self._close(lane)
            self._fail(list(lane.running.values()), exc)
            lane.running.clear()
            return  # the pool replaces the worker
        self._close(lane)
        self._pool.release(lane.worker)

    def _close(self, lane: Lane[W]) -> None:
        lane.closed = True
        with contextlib.suppress(ValueError):
            self._lanes.remove(lane)
        self._room.set()

    def _deliver(self, lane: Lane[W], step: Step) -> None:
        if step.iteration:
            now = time.perf_counter()
            self._observer.batch(step.size, step.handler_ms, (now - lane.last_step) * 1000, step.metrics)
            lane.last_step = now
        for request_id, response, last in step.chunks:
            pending = lane.running.get(request_id)
            if pending is None:  # a chunk after its request's last one
                continue
            if last:
                del lane.running[request_id]
                self._room.set()
            if request_id not in lane.leaving:
                self._chunk(pending, response, last)
            elif last:
                lane.leaving.discard(request_id)
        for request_id in step.dropped:
            lane.leaving.discard(request_id)
            if lane.running.pop(request_id, None) is not None:
                self._room.set()

    @staticmethod
    def _chunk(pending: Pending, response: Response, last: bool) -> None:
        """One chunk of a request's answer: the first answers it, the others follow through its queue."""
        if pending.chunks is not None:
            if response.status >= 400:
                pending.chunks.put_nowait(_error(response))
                return
            pending.chunks.put_nowait(response.payload)
            if last:
                pending.chunks.put_nowait(None)
        elif pending.future.done():  # its client went away
            return
        elif last:
            pending.future.set_result(response)
        else:
            pending.chunks = asyncio.Queue()
            pending.future.set_result(replace(response, more=rest_of_stream(pending.chunks)))

    async def close(self, timeout: float) -> None:
        await super().close(timeout)
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.cancel() and not waiter.cancelled() and waiter.exception() is None:
            self._pool.release(waiter.result())  # given, never taken


def _error(response: Response) -> HandlerError:
    """The error a chunk with a status of 400 or more ends its stream with: the message of servekit's JSON error
    body, else the chunk's text."""
    text = response.payload.decode("utf-8", "replace")
    with contextlib.suppress(orjson.JSONDecodeError):
        body = orjson.loads(response.payload)
        if isinstance(body, dict) and isinstance(body.get("message"), str):
            text = body["message"]
    return HandlerError(text[:4096], response.status)
