"""The pool (``servekit.pool``) alone, with fake workers in the same process: ``run`` sends a batch to an idle worker,
else into a busy one's pipeline, and reads each worker's results in order; a worker that dies fails the batch it ran
with its error exactly once, the batches sent behind it run elsewhere, and one replacement starts after the back-off
(a fake clock: nothing sleeps); scaling retires idle workers at once and busy ones after their batches; a describe
request goes ahead of the batches. Then the batcher and the pool together. No worker process, no sleeps."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable, Collection, Coroutine, Sequence
from typing import Any

import pytest

from servekit.batcher import Batcher
from servekit.errors import ResponseTimeoutError, ServekitError, ServiceUnavailableError, WorkerDiedError
from servekit.pool import BACKOFF_S, WorkerPool
from servekit.pool_queue import CRASH_LOOP, MAX_PIPELINE, PIPELINE, PIPELINE_S
from servekit.process import OnChunks, PoolSettings, WorkerProcess
from servekit.protocol import BatchResult, LoadCommand, MetricRecord, Request, Response, Step

SETTINGS = PoolSettings(response_timeout=60, startup_timeout=60, max_response_size=1000)
Answer = BatchResult | ServekitError


class FakeWorker(WorkerProcess):
    """A worker without a process: what it is sent is kept; it answers each batch, in order, when the test says."""

    def __init__(self, command: LoadCommand, settings: PoolSettings, on_exit: Callable[[WorkerProcess], None]) -> None:
        super().__init__(command, settings, on_exit)
        self.batches: list[list[str]] = []  # request ids of each batch sent
        self.answers: asyncio.Queue[Answer] = asyncio.Queue()
        self.ended: list[str] = []  # "stop", "kill": how the pool ended it

    async def start(self) -> None:
        self.status = "READY"

    def send_batch(self, requests: list[Request]) -> None:
        assert self.status == "READY", "a batch sent to a worker that is gone"
        self.batches.append([r.request_id for r in requests])

    def send_describe(self, request: Request) -> None:
        self.batches.append([f"describe:{request.request_id}"])

    async def receive_batch(self, n_requests: int, on_chunks: OnChunks | None = None) -> BatchResult:
        answer = await self.answers.get()
        if isinstance(answer, ServekitError):
            self.status = "UNLOADING"  # as WorkerProcess does: the worker is killed before the error is raised
            raise answer
        return answer

    async def receive_step(self, running: Collection[str]) -> Step:
        answer = await self.answers.get()
        if isinstance(answer, ServekitError):
            self.status = "UNLOADING"
            raise answer
        return Step(())

    def answer(self, *ids: str) -> None:
        self.answers.put_nowait(BatchResult([Response(200, None, i.encode()) for i in ids]))

    def die(self, signal_name: str = "SIGKILL") -> None:
        self.answers.put_nowait(WorkerDiedError(f"Worker died while running model m: killed by {signal_name}"))

    async def stop(self, timeout: float = 5.0) -> bool:
        self.status = "UNLOADING"
        self.ended.append("stop")
        return True

    async def kill(self) -> int | None:
        self.status = "UNLOADING"
        self.ended.append("kill")
        return None


class Clock:
    """The pool's ``sleep``: each back-off is kept and lasts until the test lets it end."""

    def __init__(self) -> None:
        self.delays: list[float] = []
        self.tick = asyncio.Event()

    async def sleep(self, seconds: float) -> None:
        self.delays.append(seconds)
        await self.tick.wait()
        self.tick.clear()


def command(gpu_id: int | None) -> LoadCommand:
    return LoadCommand("m", "/nonexistent", "handler", {}, {}, 4, gpu_id, 1)


async def new_pool(n: int, clock: Clock | None = None) -> tuple[WorkerPool, list[FakeWorker]]:
    spawned: list[FakeWorker] = []

    def spawn(cmd: LoadCommand, settings: PoolSettings, on_exit: Callable[[WorkerProcess], None]) -> WorkerProcess:
        spawned.append(FakeWorker(cmd, settings, on_exit))
        return spawned[-1]

    pool = WorkerPool(command, SETTINGS, spawn=spawn, sleep=(clock or Clock()).sleep)
    await pool.scale(n)
    return pool, spawned


def batch(*ids: str) -> list[Request]:
    return [Request(i, {}, ()) for i in ids]


def ids(result: BatchResult) -> list[bytes]:
    assert isinstance(result.outcome, list)
    return [r.payload for r in result.outcome]


def run_async(test: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(asyncio.wait_for(test(), 10))  # a bug hangs no longer than this


async def turns(n: int = 5) -> None:
    """Let the loop run ``n`` turns (no time passes): tasks woken by what the test did take their steps."""
    for _ in range(n):
        await asyncio.sleep(0)


def test_pool_run_sends_to_idle_workers_first_then_into_a_busy_ones_pipeline() -> None:
    async def scenario() -> None:
        pool, (w1, w2) = await new_pool(2)
        assert pool.room() and pool.slots() == 2 * PIPELINE  # one to each idle worker, then into their pipelines
        await pool.wait_idle()
        a = asyncio.ensure_future(pool.run(batch("a")))
        b = asyncio.ensure_future(pool.run(batch("b")))
        assert (w1.batches, w2.batches) == ([["a"]], [["b"]])  # sent before run returned, one per idle worker
        assert PIPELINE == 2 and pool.room() and pool.slots() == 2  # no worker is idle, but each has room for one more
        c = asyncio.ensure_future(pool.run(batch("c")))
        d = asyncio.ensure_future(pool.run(batch("d")))
        assert w1.batches + w2.batches == [["a"], ["c"], ["b"], ["d"]] and not pool.room()
        e = asyncio.ensure_future(pool.run(batch("e")))  # no room: it waits for a worker
        assert pool.slots() == pool.slots(overloaded=True) == 0  # a batch waits: none goes ahead of it
        await turns()
        assert sum(len(w.batches) for w in (w1, w2)) == 4 and pool.busy == 2
        w1.answer("a")
        assert ids(await a) == [b"a"]
        assert w1.batches[-1] == ["e"]  # the waiting batch took the room in w1's pipeline
        w1.answer("c")
        w1.answer("e")
        w2.answer("b")
        w2.answer("d")
        assert [ids(await t) for t in (c, e, b, d)] == [[b"c"], [b"e"], [b"b"], [b"d"]]
        assert pool.busy == 0 and pool.room()
        assert set(pool.sent) == {"a", "b", "c", "d", "e"}  # when each request went, for the API's latency
        await pool.close()

    run_async(scenario)


def test_pool_roundtrip_of_a_pipelined_batch_starts_when_the_batch_before_it_ends() -> None:
    async def scenario() -> None:
        pool, (w,) = await new_pool(1)
        a = asyncio.ensure_future(pool.run(batch("a")))
        b = asyncio.ensure_future(pool.run(batch("b")))
        await turns()
        before = asyncio.get_running_loop().time()
        w.answer("a")
        await a
        w.answer("b")
        result = await b
        assert 0 <= result.roundtrip_ms <= (asyncio.get_running_loop().time() - before) * 1000 + 1
        await pool.close()

    run_async(scenario)


def test_pool_worker_death_fails_its_batch_once_reruns_the_one_behind_and_restarts() -> None:
    async def scenario() -> None:
        clock = Clock()
        pool, (w1, w2) = await new_pool(2, clock)
        a = asyncio.ensure_future(pool.run(batch("a")))
        b = asyncio.ensure_future(pool.run(batch("b")))
        behind = asyncio.ensure_future(pool.run(batch("behind")))  # in w1's pipeline, behind "a"
        assert w1.batches == [["a"], ["behind"]]
        w1.die()
        with pytest.raises(WorkerDiedError, match="SIGKILL"):
            await a
        await turns()
        assert w2.batches == [["b"], ["behind"]]  # never ran on w1: sent once more, to w2's pipeline
        assert pool.workers == [w2] and clock.delays == [BACKOFF_S[0]] and pool.restarts == 0
        w2.answer("b")
        w2.answer("behind")
        assert ids(await b) == [b"b"] and ids(await behind) == [b"behind"]
        clock.tick.set()  # the back-off ends: one replacement starts
        await turns()
        assert pool.restarts == 1 and len(pool.workers) == 2 and pool.ready == 2
        assert pool.unavailable() is None and clock.delays == [BACKOFF_S[0]]
        await pool.close()

    run_async(scenario)


def test_pool_batch_behind_a_dead_worker_waits_for_its_replacement() -> None:
    async def scenario() -> None:
        clock = Clock()
        pool, spawned = await new_pool(1, clock)
        doomed = asyncio.ensure_future(pool.run(batch("doomed")))
        behind = asyncio.ensure_future(pool.run(batch("behind")))
        spawned[0].die()
        with pytest.raises(WorkerDiedError):
            await doomed
        assert not pool.room() and pool.unavailable() is None  # no worker, one coming: it waits
        clock.tick.set()
        await turns()
        replacement = spawned[1]
        assert replacement.batches == [["behind"]]  # served first on the replacement
        replacement.answer("behind")
        assert ids(await behind) == [b"behind"]
        await pool.close()

    run_async(scenario)


def test_pool_idle_worker_that_exits_is_replaced() -> None:
    async def scenario() -> None:
        clock = Clock()
        pool, (w1, w2) = await new_pool(2, clock)
        w1.status = "UNLOADING"
        pool._on_exit(w1)  # its process watcher saw it exit
        await turns()
        assert pool.workers == [w2] and clock.delays == [BACKOFF_S[0]]
        clock.tick.set()
        await turns()
        assert len(pool.workers) == 2 and pool.restarts == 1
        await pool.close()

    run_async(scenario)


def test_pool_crash_loop_refuses_and_fails_the_batches_waiting() -> None:
    async def scenario() -> None:
        clock = Clock()
        pool, spawned = await new_pool(1, clock)
        for round_ in range(CRASH_LOOP):
            running = asyncio.ensure_future(pool.run(batch(f"crash{round_}")))
            if round_ == CRASH_LOOP - 1:
                waiting = asyncio.ensure_future(pool.run(batch("behind")))
            await turns()
            spawned[-1].die("SIGSEGV")
            with pytest.raises(WorkerDiedError):
                await running
            await turns()
            if round_ < CRASH_LOOP - 1:
                clock.tick.set()
                await turns()
        assert clock.delays == list(BACKOFF_S[:CRASH_LOOP])  # the back-off grows with each failure in a row
        reason = pool.unavailable()
        assert reason is not None and f"failed {CRASH_LOOP} times in a row" in reason
        with pytest.raises(ServiceUnavailableError, match="failed 3 times"):
            await waiting
        with pytest.raises(ServiceUnavailableError, match="failed 3 times"):
            await pool.wait_idle()
        await pool.close()

    run_async(scenario)


def test_pool_response_timeout_is_a_death_like_any_other() -> None:
    async def scenario() -> None:
        pool, (w1, w2) = await new_pool(2)
        hung = asyncio.ensure_future(pool.run(batch("hung")))
        w1.answers.put_nowait(ResponseTimeoutError("Model m did not answer within response_timeout=2s"))
        with pytest.raises(ResponseTimeoutError):
            await hung
        assert pool.workers == [w2]
        await pool.close()

    run_async(scenario)


def test_pool_scale_down_retires_idle_workers_now_and_busy_ones_after_their_batches() -> None:
    async def scenario() -> None:
        pool, (busy, idle) = await new_pool(2)
        running = asyncio.ensure_future(pool.run(batch("a")))
        assert busy.batches == [["a"]]
        await pool.scale(1)
        assert "stop" in idle.ended and "stop" not in busy.ended  # the idle one went first
        await pool.scale(0)
        assert busy.retiring and "stop" not in busy.ended and not pool.room()  # it takes no more batches
        busy.answer("a")
        assert ids(await running) == [b"a"]
        await turns()
        assert "stop" in busy.ended and pool.workers == [] and pool.unavailable() is not None
        with pytest.raises(ServiceUnavailableError):
            await pool.run(batch("late"))
        await pool.scale(2)  # and up again
        assert pool.ready == 2 and pool.room()
        await pool.close()

    run_async(scenario)


def test_pool_describe_goes_ahead_of_the_batches() -> None:
    async def scenario() -> None:
        pool, (w,) = await new_pool(1)
        a = asyncio.ensure_future(pool.run(batch("a")))
        described = asyncio.ensure_future(pool.describe(Request("d", {}, ())))
        await turns()
        assert not pool.room()  # the busy worker takes no batch before the describe request
        w.answer("a")
        await a
        await turns()
        assert w.batches == [["a"], ["describe:d"]]
        w.answer("description")
        assert ids(await described) == [b"description"]
        assert pool.room()
        await pool.close()

    run_async(scenario)


def test_pool_lanes_acquire_step_and_release_a_worker() -> None:
    async def scenario() -> None:
        clock = Clock()
        pool, (w,) = await new_pool(1, clock)
        worker = await pool.acquire()
        assert worker is w and not pool.room() and pool.busy == 1
        pool.send(worker, batch("x"))
        w.answers.put_nowait(BatchResult([]))
        await pool.step(worker, ["x"])
        pool.release(worker)
        assert pool.room()
        worker = await pool.acquire()
        w.die()
        with pytest.raises(WorkerDiedError):
            await pool.step(worker, ["y"])
        await turns()
        assert pool.workers == [] and clock.delays == [BACKOFF_S[0]]  # the same death handling as ``run``
        await pool.close()

    run_async(scenario)


def test_pool_close_fails_the_batches_waiting_for_a_worker() -> None:
    async def scenario() -> None:
        pool, (w,) = await new_pool(1)
        running = asyncio.ensure_future(pool.run(batch("a")))
        pipelined = asyncio.ensure_future(pool.run(batch("b")))
        waiting = asyncio.ensure_future(pool.run(batch("c")))
        await turns()
        await pool.close()
        assert "stop" in w.ended
        w.die()  # its socket closed: the running batch can no longer be read
        for task in (running, pipelined, waiting):
            with pytest.raises((WorkerDiedError, ServiceUnavailableError)):
                await task

    run_async(scenario)


def test_pool_a_caller_that_stops_waiting_costs_nothing() -> None:
    """A batch whose caller cancels it: sent, its answer is read and dropped and the worker stays, its next batch
    getting its own answer; still waiting for a worker, it is never sent."""

    async def scenario() -> None:
        clock = Clock()
        pool, (w,) = await new_pool(1, clock)
        a = pool.run(batch("a"))
        b = pool.run(batch("b"))
        waiting = pool.run(batch("waiting"))  # the pipeline is full: it waits for the worker
        await turns()
        assert w.batches == [["a"], ["b"]]
        a.cancel()
        waiting.cancel()
        await turns()
        w.answer("a")
        w.answer("b")
        assert ids(await b) == [b"b"]  # not a's answer: the worker's answers stay in step
        c = pool.run(batch("c"))
        await turns()
        w.answer("c")
        assert ids(await c) == [b"c"]
        assert w.batches == [["a"], ["b"], ["c"]] and w.ended == [] and pool.workers == [w] and clock.delays == []
        await pool.close()

    run_async(scenario)


def test_pool_full_batches_of_a_fast_handler_go_into_a_deeper_pipeline_on_the_shortest_line() -> None:
    async def scenario() -> None:
        pool, (w1, w2) = await new_pool(2)
        first = [pool.run(batch(f"x{i}"), overloaded=True) for i in range(2 * PIPELINE)]
        assert not pool.room(overloaded=True)  # the handler's time is not known yet: two deep
        for w in (w1, w2) * PIPELINE:
            w.answers.put_nowait(BatchResult([Response(200, None, b"")], handler_ms=1.0))  # 1 ms a batch
        await asyncio.gather(*first)
        depth = math.ceil(PIPELINE_S / 0.001)
        assert PIPELINE < depth < MAX_PIPELINE and pool.batch_s == pytest.approx(0.001)
        running = [pool.run(batch(f"y{i}")) for i in range(2 * PIPELINE)]
        assert not pool.room() and pool.room(overloaded=True)  # a partial batch waits; a full one may go
        running += [pool.run(batch(f"f{i}"), overloaded=True) for i in range(2 * (depth - PIPELINE))]
        assert (len(w1.batches), len(w2.batches)) == (PIPELINE + depth, PIPELINE + depth)  # the shorter line first
        assert not pool.room(overloaded=True)
        for w in (w1, w2) * depth:
            w.answers.put_nowait(BatchResult([Response(200, None, b"")], handler_ms=100.0))  # now slow
        await asyncio.gather(*running)
        assert pool.busy == 0 and pool._depth(overloaded=True) == PIPELINE  # a slow handler's pipeline is two deep
        await pool.close()

    run_async(scenario)


class Observer:
    def __init__(self) -> None:
        self.sizes: list[int] = []

    def queued(self, seconds: float) -> None:
        pass

    def batch(self, size: int, handler_ms: float, roundtrip_ms: float, records: Sequence[MetricRecord]) -> None:
        self.sizes.append(size)


def test_batcher_and_pool_serve_the_requests_behind_a_crash_on_the_replacement() -> None:
    """tests/test_faults.py's scenario without processes: one worker, batch 1; the crash fails its own request only,
    the request pipelined behind it and the one still queued are served once, by the replacement."""

    async def scenario() -> None:
        clock = Clock()
        pool, spawned = await new_pool(1, clock)
        observer = Observer()
        batcher: Batcher[WorkerProcess] = Batcher("m", pool, 1, 100, observer)
        submitted: list[Awaitable[Response]] = []
        for name in ("slow", "kill", "after0", "after1"):
            submitted.append(asyncio.ensure_future(batcher.submit(Request(name, {}, ()))))
            await turns()
        first = spawned[0]
        assert first.batches == [["slow"]]  # arrivals while it is busy wait in the batcher's queue
        first.answer("slow")
        await turns()
        assert first.batches == [["slow"], ["kill"], ["after0"]]  # the next two: one runs, one is in the pipeline
        first.die()
        await turns()
        clock.tick.set()
        await turns(10)
        replacement = spawned[1]
        assert replacement.batches == [["after0"]]
        replacement.answer("after0")
        await turns()
        assert replacement.batches == [["after0"], ["after1"]]
        replacement.answer("after1")
        results = await asyncio.gather(*submitted, return_exceptions=True)
        assert isinstance(results[1], WorkerDiedError)
        assert [r.payload for r in results if isinstance(r, Response)] == [b"slow", b"after0", b"after1"]
        assert observer.sizes == [1, 1, 1]
        await batcher.close(0)
        await pool.close()

    run_async(scenario)
