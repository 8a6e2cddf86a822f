"""Overload: a request's own deadline, clients that disconnect while queued; neither reaches a worker."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.helpers import Server, serving_one

# Sleeps on request "slow"; every answer says how many requests the handler has seen so far.
COUNTING_HANDLER = """
import time

seen = []


def handle(data, context):
    if data is None:
        return None
    out = []
    for row in data:
        seen.append(row["body"])
        if row["body"].startswith("slow"):
            time.sleep(1.5)
        out.append({"seen": list(seen)})
    return out
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with serving_one(tmp_path_factory.mktemp("overload"), "counting", COUNTING_HANDLER, "batchSize: 1\n") as srv:
        yield srv


def post_text(server: Server, text: str, **kwargs: object) -> httpx.Response:
    return server.post("/predictions/counting", content=text.encode(), headers={"content-type": "text/plain"}, **kwargs)


def in_background(server: Server, text: str) -> threading.Thread:
    thread = threading.Thread(target=post_text, args=(server, text))
    thread.start()
    time.sleep(0.3)  # let it reach the worker
    return thread


def test_overload_request_past_its_deadline_is_504_and_never_runs(server: Server) -> None:
    busy = in_background(server, "slow1")
    late = server.post(
        "/predictions/counting",
        content=b"late",
        headers={"content-type": "text/plain", "x-servekit-timeout-ms": "200"},
    )
    assert late.status_code == 504
    assert "timed out in queue after 200 ms" in late.json()["message"]
    busy.join()
    seen = post_text(server, "after1").json()["seen"]
    assert seen[-2:] == ["slow1", "after1"] and "late" not in seen


def test_overload_bad_deadline_header_is_400(server: Server) -> None:
    response = server.post("/predictions/counting", content=b"x", headers={"x-servekit-timeout-ms": "soon"})
    assert response.status_code == 400
    assert "x-servekit-timeout-ms" in response.json()["message"]


def test_overload_client_that_disconnects_while_queued_never_reaches_the_worker(server: Server) -> None:
    busy = in_background(server, "slow2")
    with pytest.raises(httpx.ReadTimeout):
        post_text(server, "gone", timeout=0.3)
    busy.join()
    seen = post_text(server, "after2").json()["seen"]
    assert seen[-2:] == ["slow2", "after2"] and "gone" not in seen
