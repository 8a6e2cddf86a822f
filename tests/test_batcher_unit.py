"""The batcher (``servekit.batcher``) alone, against a fake pool in the same process: batches leave when a worker is
free and never exceed ``batch_size``, a full queue refuses, queued requests time out or leave with their client, a
failed batch fails its own requests only, streamed chunks reach their request, and close drains. No worker process,
no sleeps: each batch waits until the test answers it."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import pytest

from servekit.batcher import Batcher, OnChunks
from servekit.errors import (
    ClientDisconnectedError,
    DeadlineExceededError,
    HandlerError,
    QueueFullError,
    ServekitError,
    ServiceUnavailableError,
    WorkerDiedError,
)
from servekit.protocol import BatchResult, Failure, MetricRecord, Request, Response


@dataclasses.dataclass
class Run:
    """A batch the batcher handed the pool, answered when the test says."""

    requests: list[Request]
    on_chunks: OnChunks
    result: asyncio.Future[BatchResult]
    freed: Callable[[], None]  # its worker has room again
    overloaded: bool  # the batcher said it refuses requests and holds a full batch

    @property
    def ids(self) -> list[str]:
        return [r.request_id for r in self.requests]

    def answer(self, roundtrip_ms: float = 2.0) -> None:
        responses = [Response(200, "text/plain", f"ok {r.request_id}".encode()) for r in self.requests]
        self.settle(BatchResult(responses, handler_ms=1.0, roundtrip_ms=roundtrip_ms))

    def settle(self, outcome: BatchResult | ServekitError) -> None:
        """Its result or error, as the pool gives it: the worker has room before the result is set."""
        self.freed()
        if isinstance(outcome, ServekitError):
            self.result.set_exception(outcome)
        else:
            self.result.set_result(outcome)


class FakePool:
    """A ``BatchRunner`` of ``workers`` workers, each taking ``pipeline`` batches at a time; every batch waits in
    ``runs`` for the test to answer it."""

    def __init__(self, workers: int = 1, pipeline: int = 1) -> None:
        self.pipeline = pipeline
        self.free = workers * pipeline
        self.deep = 0  # of the free slots, those taken only under overload (a deeper pipeline)
        self.reason: str | None = None
        self.runs: asyncio.Queue[Run] = asyncio.Queue()
        self._freed = asyncio.Event()

    def unavailable(self) -> str | None:
        return self.reason

    async def wait_idle(self) -> None:
        while self.free < self.pipeline:  # no worker without a batch
            if self.reason is not None:
                raise ServiceUnavailableError(self.reason)
            self._freed.clear()
            await self._freed.wait()

    def room(self, overloaded: bool = False) -> bool:
        return self.free > 0

    def slots(self, overloaded: bool = False) -> int:
        return self.free if overloaded else max(0, self.free - self.deep)

    def run(
        self, requests: list[Request], on_chunks: OnChunks, overloaded: bool = False
    ) -> asyncio.Future[BatchResult]:
        assert self.free > 0, "the batcher handed a batch over without room"
        self.free -= 1
        run = Run(requests, on_chunks, asyncio.get_running_loop().create_future(), self._freed_one, overloaded)
        self.runs.put_nowait(run)
        return run.result

    def _freed_one(self) -> None:
        self.free += 1
        self._freed.set()

    def fail(self, reason: str) -> None:
        self.reason = reason
        self._freed.set()


class Observer:
    """A ``BatchObserver`` that keeps what it is told."""

    def __init__(self) -> None:
        self.queue_times: list[float] = []
        self.batches: list[tuple[int, float, float]] = []
        self.on_batch: Callable[[], None] = lambda: None

    def queued(self, seconds: float) -> None:
        self.queue_times.append(seconds)

    def batch(self, size: int, handler_ms: float, roundtrip_ms: float, records: Sequence[MetricRecord]) -> None:
        self.batches.append((size, handler_ms, roundtrip_ms))
        self.on_batch()


def request(n: int | str) -> Request:
    return Request(f"r{n}", {}, ())


def run_async(test: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(asyncio.wait_for(test(), 10))  # a bug hangs no longer than this


async def started(coroutines: list[Coroutine[Any, Any, Response]]) -> list[asyncio.Task[Response]]:
    """Tasks for ``coroutines``, each run to its first wait (queued in the batcher, in order)."""
    tasks = []
    for coroutine in coroutines:
        tasks.append(asyncio.ensure_future(coroutine))
        await asyncio.sleep(0)  # one turn of the loop, not a sleep: the task submits before the next one does
    return tasks


def make(pool: FakePool, batch_size: int = 4, queue_size: int = 100) -> tuple[Batcher[Any], Observer]:
    observer = Observer()
    return Batcher("m", pool, batch_size, queue_size, observer), observer


def test_batcher_sends_a_lone_request_at_once_when_a_worker_is_idle() -> None:
    async def scenario() -> None:
        pool = FakePool()
        batcher, observer = make(pool)
        answer = asyncio.ensure_future(batcher.submit(request(0)))
        run = await pool.runs.get()
        assert run.ids == ["r0"]  # a batch of one: it did not wait for companions
        run.answer(roundtrip_ms=7.0)
        response = await answer
        assert (response.status, response.payload) == (200, b"ok r0")
        assert observer.batches == [(1, 1.0, 7.0)] and len(observer.queue_times) == 1
        await batcher.close(0)

    run_async(scenario)


def test_batcher_batches_requests_that_wait_for_a_busy_worker_up_to_batch_size() -> None:
    async def scenario() -> None:
        pool = FakePool()
        batcher, _ = make(pool, batch_size=3)
        first = await started([batcher.submit(request(0))])
        head = await pool.runs.get()
        waiting = await started([batcher.submit(request(i)) for i in range(1, 6)])
        assert pool.runs.empty() and batcher.depth == 5  # the worker is busy: they wait in the queue
        head.answer()
        second = await pool.runs.get()
        assert second.ids == ["r1", "r2", "r3"]  # all that waited, up to batch_size, in order
        second.answer()
        third = await pool.runs.get()
        assert third.ids == ["r4", "r5"]
        third.answer()
        responses = await asyncio.gather(*first, *waiting)
        assert [r.payload for r in responses] == [f"ok r{i}".encode() for i in range(6)]
        await batcher.close(0)

    run_async(scenario)


def test_batcher_hands_the_next_batch_over_before_answering_the_last() -> None:
    """While requests wait, the pool gets the next batch before this one's responses are set (issue 13)."""

    async def scenario() -> None:
        pool = FakePool(workers=1, pipeline=2)
        batcher, observer = make(pool, batch_size=2)
        tasks = [asyncio.ensure_future(batcher.submit(request(i))) for i in range(6)]  # all queued in one turn
        a, b = await pool.runs.get(), await pool.runs.get()
        assert (a.ids, b.ids) == (["r0", "r1"], ["r2", "r3"])  # the worker holds two: it runs one, the next waits
        assert pool.runs.empty()
        handed_before_answer: list[bool] = []
        observer.on_batch = lambda: handed_before_answer.append(not pool.runs.empty())
        a.answer()
        c = await pool.runs.get()
        assert c.ids == ["r4", "r5"] and handed_before_answer == [True]
        b.answer()
        c.answer()
        assert len(await asyncio.gather(*tasks)) == 6
        await batcher.close(0)

    run_async(scenario)


def test_batcher_tells_the_pool_when_it_is_overloaded() -> None:
    """Once the batcher refuses requests, a full batch may go into a deeper pipeline; before, batches wait here."""

    async def scenario() -> None:
        pool = FakePool()
        batcher, _ = make(pool, batch_size=2, queue_size=4)
        tasks = await started([batcher.submit(request(i)) for i in range(3)])
        head = await pool.runs.get()
        head.answer()
        run = await pool.runs.get()
        assert (head.overloaded, run.ids, run.overloaded) == (False, ["r1", "r2"], False)  # full, none refused
        tasks += await started([batcher.submit(request(i)) for i in range(3, 7)])  # the queue is full
        with pytest.raises(QueueFullError):
            await batcher.submit(request("refused"))
        run.answer()
        flags = []
        for _ in range(2):
            run = await pool.runs.get()
            flags.append(run.overloaded)
            run.answer()
        assert flags == [True, True]
        await asyncio.gather(*tasks)
        await batcher.close(0)

    run_async(scenario)


def test_batcher_heads_read_in_one_turn_hold_their_places_until_the_next() -> None:
    """A head that passes (``refusal(promise=True)``) counts against the queue until the next turn of the loop, so that
    the heads read in one turn do not all pass; the request itself, queued after its body, is not refused by it."""

    async def scenario() -> None:
        pool = FakePool()
        batcher, _ = make(pool, batch_size=1, queue_size=3)
        running = await started([batcher.submit(request(0))])  # the worker is busy from now on
        queued = await started([batcher.submit(request(1))])
        assert batcher.refusal(promise=True) is None
        assert batcher.refusal(promise=True) is None
        assert isinstance(batcher.refusal(promise=True), QueueFullError)  # 1 queued + 2 promised
        assert batcher.refusal() is None  # a promised request's own submit
        await asyncio.sleep(0)  # the next turn: the promised requests have been queued (or not)
        assert batcher.refusal(promise=True) is None
        (await pool.runs.get()).answer()
        (await pool.runs.get()).answer()
        await asyncio.gather(*running, *queued)
        await batcher.close(0)

    run_async(scenario)


def test_batcher_under_overload_heads_that_the_pool_takes_at_once_need_no_place_in_the_queue() -> None:
    """Under overload (a refusal in the last second), requests the pool would take at once in full batches wait for
    no worker: their heads pass beyond the queue's room, and each full batch leaves as its last request is queued,
    in the same turn of the event loop (issue 13: the heads read in one turn are not held to the queue's size while
    the worker has room for more). Without a refusal, the queue alone bounds them."""

    async def scenario() -> None:
        pool = FakePool(workers=1, pipeline=3)
        pool.deep = 2  # a fast model: two of its three slots only under overload
        batcher, _ = make(pool, batch_size=2, queue_size=2)
        first = await started([batcher.submit(request(i)) for i in range(3)])  # one sent alone, two wait
        assert pool.runs.qsize() == 1 and batcher.depth == 2
        assert isinstance(batcher.refusal(promise=True), QueueFullError)  # overloaded from now on
        (await pool.runs.get()).answer()
        await first[0]
        assert pool.runs.qsize() == 1 and pool.free == 2 and batcher.depth == 0  # the waiting two were sent
        passed = [batcher.refusal(promise=True) for _ in range(2 + 2 * 2)]
        assert passed == [None] * 6  # the queue's 2, and 2 batches of 2 that the deeper pipeline takes at once
        assert isinstance(batcher.refusal(promise=True), QueueFullError)
        second = [asyncio.ensure_future(batcher.submit(request(i))) for i in range(8, 14)]
        await asyncio.sleep(0)  # one turn: every task has submitted
        assert pool.runs.qsize() == 3 and batcher.depth == 2  # two more batches left at once, two requests wait
        assert not any(task.done() for task in second)  # none refused
        for _ in range(4):
            (await pool.runs.get()).answer()
        answers = [(await task).payload for task in first[1:] + second]
        assert answers == [f"ok r{i}".encode() for i in [1, 2, *range(8, 14)]]
        await batcher.close(0)

    run_async(scenario)


def test_batcher_refuses_when_the_queue_is_full_or_no_worker_can_serve() -> None:
    async def scenario() -> None:
        pool = FakePool()
        batcher, _ = make(pool, batch_size=1, queue_size=2)
        running = await started([batcher.submit(request(0))])
        head = await pool.runs.get()
        queued = await started([batcher.submit(request(1)), batcher.submit(request(2))])
        with pytest.raises(QueueFullError) as full:
            await batcher.submit(request(3))
        assert full.value.status_code == 503
        assert isinstance(batcher.refusal(), QueueFullError)
        pool.reason = "has no worker"
        refusal = batcher.refusal()
        assert isinstance(refusal, ServiceUnavailableError) and refusal.message == 'Model "m" has no worker'
        pool.reason = None
        head.answer()
        for _ in queued:
            (await pool.runs.get()).answer()
        await asyncio.gather(*running, *queued)
        assert batcher.refusal() is None
        await batcher.close(0)

    run_async(scenario)


def test_batcher_request_that_times_out_in_the_queue_never_reaches_a_worker() -> None:
    async def scenario() -> None:
        pool = FakePool()
        batcher, _ = make(pool, batch_size=4)
        running = await started([batcher.submit(request(0))])
        head = await pool.runs.get()
        with pytest.raises(DeadlineExceededError, match="timed out in queue"):
            await batcher.submit(request("late"), timeout_s=0.001)
        kept = await started([batcher.submit(request(1), timeout_s=60)])
        head.answer()
        run = await pool.runs.get()
        assert run.ids == ["r1"]  # the expired request left the queue
        run.answer()
        await asyncio.gather(*running, *kept)
        await batcher.close(0)

    run_async(scenario)


def test_batcher_client_that_goes_away_leaves_the_queue() -> None:
    async def scenario() -> None:
        pool = FakePool()
        batcher, _ = make(pool)
        running = await started([batcher.submit(request(0))])
        head = await pool.runs.get()
        hooks: set[Callable[[], Any]] = set()
        gone = await started([batcher.submit(request("gone"), hooks=hooks)])
        cancelled = await started([batcher.submit(request("cancelled"))])
        kept = await started([batcher.submit(request(1))])
        assert batcher.depth == 3 and len(hooks) == 1
        for hook in hooks:
            hook()  # the connection closed
        cancelled[0].cancel()
        with pytest.raises(ClientDisconnectedError):
            await gone[0]
        with pytest.raises(asyncio.CancelledError):
            await cancelled[0]
        assert batcher.depth == 1 and not hooks
        head.answer()
        run = await pool.runs.get()
        assert run.ids == ["r1"]
        run.answer()
        await asyncio.gather(*running, *kept)
        await batcher.close(0)

    run_async(scenario)


def test_batcher_failed_batch_fails_only_its_own_requests() -> None:
    async def scenario() -> None:
        pool = FakePool(workers=3)
        batcher, _ = make(pool, batch_size=2)
        tasks = await started([batcher.submit(request(i)) for i in range(1)])
        died = await pool.runs.get()
        tasks += await started([batcher.submit(request(i)) for i in range(1, 2)])
        failed = await pool.runs.get()
        tasks += await started([batcher.submit(request(i)) for i in range(2, 3)])
        served = await pool.runs.get()
        died.settle(WorkerDiedError("Worker died while running model m: killed by SIGKILL"))
        failed.settle(BatchResult(Failure(507, "MemoryError", "Out of resources", verbatim=True)))
        served.answer()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert isinstance(results[0], WorkerDiedError) and "SIGKILL" in results[0].message
        assert isinstance(results[1], HandlerError) and (results[1].status_code, results[1].message) == (
            507,
            "Out of resources",
        )
        assert isinstance(results[2], Response) and results[2].payload == b"ok r2"
        after = await started([batcher.submit(request(3))])  # the batcher goes on
        (await pool.runs.get()).answer()
        await asyncio.gather(*after)
        await batcher.close(0)

    run_async(scenario)


def test_batcher_no_worker_left_fails_the_queued_requests_with_503() -> None:
    async def scenario() -> None:
        pool = FakePool()
        batcher, _ = make(pool)
        running = await started([batcher.submit(request(0))])
        head = await pool.runs.get()
        queued = await started([batcher.submit(request(1))])
        pool.fail("has no healthy worker")  # the dispatcher waits for an idle worker; none will come
        with pytest.raises(ServiceUnavailableError) as refused:
            await queued[0]
        assert refused.value.message == 'Model "m" has no healthy worker'
        head.settle(ServiceUnavailableError("has no worker to serve inference request"))
        with pytest.raises(ServiceUnavailableError, match='Model "m" has no worker'):
            await running[0]
        await batcher.close(0)

    run_async(scenario)


def test_batcher_streams_chunks_to_their_request_then_the_last() -> None:
    async def scenario() -> None:
        pool = FakePool()
        batcher, _ = make(pool, batch_size=2)
        running = await started([batcher.submit(request(0))])
        head = await pool.runs.get()
        tasks = await started([batcher.submit(request("s")), batcher.submit(request("plain"))])
        head.answer()
        run = await pool.runs.get()
        run.on_chunks([(0, Response(200, "text/plain", b"one", {"x-stream": "yes"}))])
        streamed = await tasks[0]
        assert (streamed.status, streamed.payload, streamed.headers) == (200, b"one", {"x-stream": "yes"})
        assert streamed.more is not None
        run.on_chunks([(0, Response(200, "text/plain", b"two"))])
        run.settle(BatchResult([Response(200, None, b"three"), Response(200, None, b"whole")]))
        assert [chunk async for chunk in streamed.more] == [b"two", b"three"]
        plain = await tasks[1]
        assert (plain.payload, plain.more) == (b"whole", None)
        await asyncio.gather(*running)
        await batcher.close(0)

    run_async(scenario)


def test_batcher_stream_that_loses_its_worker_ends_with_the_error() -> None:
    async def scenario() -> None:
        pool = FakePool()
        batcher, _ = make(pool)
        task = asyncio.ensure_future(batcher.submit(request("s")))
        run = await pool.runs.get()
        run.on_chunks([(0, Response(200, None, b"first"))])
        streamed = await task
        run.settle(WorkerDiedError("Worker died while running model m: exit code 1"))
        assert streamed.more is not None
        with pytest.raises(WorkerDiedError, match="exit code 1"):
            async for _ in streamed.more:
                pass
        await batcher.close(0)

    run_async(scenario)


def test_batcher_close_drains_running_and_queued_then_refuses() -> None:
    async def scenario() -> None:
        pool = FakePool()
        batcher, _ = make(pool, batch_size=1)
        tasks = await started([batcher.submit(request(i)) for i in range(2)])
        head = await pool.runs.get()
        closing = asyncio.ensure_future(batcher.close(60))
        await asyncio.sleep(0)  # a turn of the loop: close has begun
        with pytest.raises(ServiceUnavailableError, match="being unregistered"):
            await batcher.submit(request("new"))
        head.answer()
        (await pool.runs.get()).answer()  # the queued request is still served while draining
        await closing
        assert [r.payload for r in await asyncio.gather(*tasks)] == [b"ok r0", b"ok r1"]

    run_async(scenario)


def test_batcher_close_after_its_timeout_fails_what_is_still_queued() -> None:
    async def scenario() -> None:
        pool = FakePool()
        batcher, _ = make(pool, batch_size=1)
        tasks = await started([batcher.submit(request(i)) for i in range(2)])
        head = await pool.runs.get()
        await batcher.close(0)
        with pytest.raises(ServiceUnavailableError, match='Model "m" was unregistered'):
            await tasks[1]
        head.answer()  # the running batch still gets its answer
        assert (await tasks[0]).payload == b"ok r0"

    run_async(scenario)


def test_batcher_batch_size_must_be_positive() -> None:
    async def scenario() -> None:
        with pytest.raises(ValueError, match="at least 1"):
            make(FakePool(), batch_size=0)

    run_async(scenario)
