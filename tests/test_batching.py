"""Dynamic batching end to end: batches form under concurrency, never past batch_size, a lone request does not
wait out the batch window, and every response belongs to its own request."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.helpers import Server, make_archive, running_server

BATCH_HANDLER = """
import os
import time


def handle(data, context):
    if data is None:
        return None
    delay = context.model_yaml_config.get("handler", {}).get("sleep", 0)
    time.sleep(delay)
    return [{"batch": len(data), "x": row["body"]["x"], "double": row["body"]["x"] * 2, "pid": os.getpid()}
            for row in data]
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("batching")
    store, work = root / "store", root / "work"
    store.mkdir()
    make_archive(
        store, "b4", BATCH_HANDLER, work=work, config="batchSize: 4\nmaxBatchDelay: 50\nhandler:\n  sleep: 0.3\n"
    )
    make_archive(store, "b1", BATCH_HANDLER, work=work, config="batchSize: 1\nhandler:\n  sleep: 0.05\n")
    make_archive(store, "lone", BATCH_HANDLER, work=work, config="batchSize: 8\nmaxBatchDelay: 5000\n")
    make_archive(
        store,
        "pair",
        BATCH_HANDLER,
        work=work,
        config="minWorkers: 2\nbatchSize: 8\nmaxBatchDelay: 5\njobQueueSize: 256\n",
    )
    with running_server(root / "run", store) as srv:
        yield srv


async def post_many(url: str, xs: list[int]) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=len(xs), max_keepalive_connections=len(xs))
    async with httpx.AsyncClient(limits=limits, timeout=60) as client:
        return await asyncio.gather(*(client.post(url, json={"x": x}) for x in xs))


def test_batcher_groups_concurrent_requests_up_to_batch_size(server: Server) -> None:
    responses = asyncio.run(post_many(server.inference + "/predictions/b4", list(range(12))))
    assert all(r.status_code == 200 for r in responses)
    batches = [r.json()["batch"] for r in responses]
    assert max(batches) > 1, batches
    assert max(batches) <= 4, batches


def test_batcher_never_batches_when_batch_size_is_one(server: Server) -> None:
    responses = asyncio.run(post_many(server.inference + "/predictions/b1", list(range(8))))
    assert [r.json()["batch"] for r in responses] == [1] * 8


def test_batcher_sends_lone_request_without_waiting_out_max_batch_delay(server: Server) -> None:
    server.post("/predictions/lone", json={"x": 0})  # warm the connection path
    start = time.monotonic()
    response = server.post("/predictions/lone", json={"x": 1})
    waited = time.monotonic() - start
    assert response.json()["batch"] == 1
    # maxBatchDelay is 5000 ms: the bound from the issue; an idle worker takes the request at once
    assert waited < 5.0


def test_batcher_answers_each_of_200_concurrent_requests_with_its_own_result(server: Server) -> None:
    xs = list(range(1000, 1200))
    responses = asyncio.run(post_many(server.inference + "/predictions/pair", xs))
    assert [r.status_code for r in responses] == [200] * 200, {r.status_code: r.text for r in responses}
    bodies = [r.json() for r in responses]
    assert [b["x"] for b in bodies] == xs
    assert all(b["double"] == 2 * b["x"] for b in bodies)
    assert len({b["pid"] for b in bodies}) == 2, "both workers served requests"
    assert max(b["batch"] for b in bodies) > 1
