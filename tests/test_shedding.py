"""Load shedding: a burst larger than a model's queue gets an answer for every request at once: the admitted ones
served once each, the excess refused 503 from the request's head (before its body is read) on a connection that
stays usable; another model on the same server, and later requests, are served as usual.

The gated model has one worker, batches of 1 and a queue of ``QUEUE``. Its handler holds a request ``gate/tag`` until
the test opens the gate (a file), so the worker is busy exactly as long as a test wants, and no assertion depends on
how fast anything runs: a refusal is prompt when it arrives while the admitted requests are still held."""

from __future__ import annotations

import contextlib
import json
import re
import socket
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from servekit.api.http import whole_request
from tests.helpers import Server, make_archive, running_server

QUEUE = 3
BURST = 11  # with the request holding the worker, 12 in all: 1 + QUEUE served, the rest refused
QUEUE_FULL_MESSAGE = f'Model "gated" queue full: {QUEUE} requests waiting (job_queue_size={QUEUE})'
QUEUE_FULL = {"code": 503, "type": "ServiceUnavailableException", "message": QUEUE_FULL_MESSAGE}

# Echoes each body with the bodies seen so far (their first 40 characters); "gate/tag" waits for the file GATES/gate.
GATED_HANDLER = """
import os
import time

GATES = __GATES__
seen = []


def handle(data, context):
    if data is None:
        return None
    out = []
    for row in data:
        body = row["body"]
        seen.append(body[:40])
        gate, _, tag = body.partition("/")
        if tag:
            open(os.path.join(GATES, gate + ".entered"), "w").close()
            deadline = time.monotonic() + 30  # a failed test still ends
            while not os.path.exists(os.path.join(GATES, gate)) and time.monotonic() < deadline:
                time.sleep(0.01)
        out.append({"echo": body, "seen": list(seen)})
    return out
"""

FAST_HANDLER = """
def handle(data, context):
    if data is None:
        return None
    return [{"echo": row["body"]} for row in data]
"""

Outcome = httpx.Response | Exception


@pytest.fixture(scope="module")
def gates(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("gates")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, gates: Path) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("shedding")
    store = root / "store"
    store.mkdir()
    one_worker = "minWorkers: 1\nmaxWorkers: 1\nbatchSize: 1\n"
    gated = GATED_HANDLER.replace("__GATES__", repr(str(gates)))
    make_archive(store, "gated", gated, work=root / "work", config=f"{one_worker}jobQueueSize: {QUEUE}\n")
    make_archive(store, "fast", FAST_HANDLER, work=root / "work", config=one_worker)
    with running_server(root / "run", store) as srv:
        yield srv


def post(server: Server, model: str, body: str) -> httpx.Response:
    return server.post(f"/predictions/{model}", content=body.encode(), headers={"content-type": "text/plain"})


def outcome(future: Future[httpx.Response], timeout: float = 30) -> Outcome:
    """The response, or the exception that took its place (a reset, a timeout)."""
    try:
        return future.result(timeout)
    except Exception as exc:  # reported by the assertions, not raised in a fixture
        return exc


def wait_until(condition: Callable[[], bool], timeout: float = 20) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def scrape(server: Server, name: str, **labels: str) -> float:
    """The sum of the samples ``name`` whose labels include ``labels``."""
    total = 0.0
    for family in text_string_to_metric_families(httpx.get(f"{server.metrics}/metrics").text):
        for sample in family.samples:
            if sample.name == name and labels.items() <= sample.labels.items():
                total += sample.value
    return total


def requests_total(server: Server, outcome: str) -> float:
    return scrape(server, "servekit_requests_total", model_name="gated", outcome=outcome)


def latency_count(server: Server) -> float:
    return scrape(server, "servekit_request_latency_seconds_count", model_name="gated")


@contextlib.contextmanager
def worker_held(server: Server, gates: Path, gate: str, pool: ThreadPoolExecutor) -> Iterator[Future[httpx.Response]]:
    """The gated model's worker held in its handler by request ``gate/primer`` until the block ends, then let go; the
    primer's response is yielded. Held before the rest arrive, the worker took nothing more with it, so exactly
    ``QUEUE`` more are admitted (a worker that is sent a burst while idle may also take the next batch into its
    pipeline, ``pool_queue.PIPELINE``, and admit one more, depending on timing)."""
    primer = pool.submit(post, server, "gated", f"{gate}/primer")
    try:
        assert wait_until((gates / f"{gate}.entered").exists), "the primer never reached the handler"
        yield primer
    finally:
        (gates / gate).touch()


def assert_refused(status: int, headers: httpx.Headers | dict[str, str], body: bytes) -> None:
    assert status == 503
    assert headers["retry-after"] in ("1", "2")  # 2 only while the front end is congested (docs/api.md)
    assert headers["x-request-id"]
    assert headers["content-type"] == "application/json"
    assert json.loads(body) == QUEUE_FULL


@dataclass
class Burst:
    answers: dict[str, Outcome]  # by body: the request that held the worker, then the burst
    answered_while_held: set[str]  # bodies answered before the worker was let go
    fast: list[tuple[str, Outcome]]  # requests to the other model while the gated one was overloaded
    probes: list[Outcome]  # requests to the gated model sent between those
    rejected: float  # servekit_requests_total{model_name="gated"} added by the burst and the probes
    succeeded: float
    observed: float  # and servekit_request_latency_seconds_count


@pytest.fixture(scope="module")
def burst(server: Server, gates: Path) -> Burst:
    """12 concurrent requests to the gated model (one holding its worker, then 11) and requests to the fast model
    while it is overloaded; answered once the worker is let go."""
    rejected, succeeded = requests_total(server, "rejected"), requests_total(server, "success")
    observed = latency_count(server)
    bodies = [f"burst/{i:02d}" for i in range(BURST)]
    with ThreadPoolExecutor(max_workers=BURST + 5) as pool:
        with worker_held(server, gates, "burst", pool) as primer:
            futures = {"burst/primer": primer, **{body: pool.submit(post, server, "gated", body) for body in bodies}}
            fast_futures = [(f"fast-{i}", pool.submit(post, server, "fast", f"fast-{i}")) for i in range(4)]
            wait_until(lambda: sum(f.done() for f in futures.values()) >= BURST - QUEUE)
            fast = [(body, outcome(future)) for body, future in fast_futures]
            probes = []
            for i in range(5):
                fast.append((f"fast-during-{i}", outcome(pool.submit(post, server, "fast", f"fast-during-{i}"))))
                probes.append(outcome(pool.submit(post, server, "gated", f"probe-{i}")))
            answered_while_held = {body for body, future in futures.items() if future.done()}
        answers = {body: outcome(future) for body, future in futures.items()}
    return Burst(
        answers,
        answered_while_held,
        fast,
        probes,
        requests_total(server, "rejected") - rejected,
        requests_total(server, "success") - succeeded,
        latency_count(server) - observed,
    )


def test_shedding_burst_serves_the_admitted_once_and_refuses_the_rest_at_once(burst: Burst) -> None:
    assert not [(body, a) for body, a in burst.answers.items() if not isinstance(a, httpx.Response)]
    answers = {body: a for body, a in burst.answers.items() if isinstance(a, httpx.Response)}
    served = {body for body, response in answers.items() if response.status_code == 200}
    refused = {body for body, response in answers.items() if response.status_code == 503}
    assert served | refused == set(answers)
    assert "burst/primer" in served and len(served) == 1 + QUEUE and len(refused) == BURST - QUEUE
    for body in served:
        assert answers[body].json()["echo"] == body  # its own answer, not another's
    for body in refused:
        assert_refused(503, answers[body].headers, answers[body].content)
    assert len({answers[body].headers["x-request-id"] for body in refused}) == len(refused)
    # promptly: every refusal arrived while the served requests were still held in the handler
    assert burst.answered_while_held == refused
    # the handler saw exactly the served bodies, each once
    seen = max((answers[body].json()["seen"] for body in served), key=len)
    assert sorted(s for s in seen if s.startswith("burst/")) == sorted(served)


def test_shedding_other_model_is_served_while_one_is_overloaded(burst: Burst) -> None:
    for body, answer in burst.fast:
        assert isinstance(answer, httpx.Response), f"{body}: {answer!r}"
        assert answer.status_code == 200 and answer.json() == {"echo": body}
    for probe in burst.probes:  # the gated model stayed overloaded all that time
        assert isinstance(probe, httpx.Response)
        assert_refused(probe.status_code, probe.headers, probe.content)


def test_shedding_full_service_resumes_after_the_burst(server: Server, burst: Burst) -> None:
    bodies = [f"after-{i}" for i in range(QUEUE)]  # concurrently: never more than the queue holds
    with ThreadPoolExecutor(max_workers=QUEUE) as pool:
        responses = list(pool.map(lambda body: post(server, "gated", body), bodies))
    with httpx.Client(base_url=server.inference, timeout=30) as client:  # one keep-alive connection
        for i in range(3):
            bodies.append(f"after-again-{i}")
            headers = {"content-type": "text/plain"}
            responses.append(client.post("/predictions/gated", content=bodies[-1].encode(), headers=headers))
    assert [(r.status_code, r.json()["echo"]) for r in responses] == [(200, body) for body in bodies]


def test_shedding_metrics_count_every_refusal_as_rejected_and_time_only_the_served(burst: Burst) -> None:
    answers = [a for a in [*burst.answers.values(), *burst.probes] if isinstance(a, httpx.Response)]
    assert burst.rejected == sum(a.status_code == 503 for a in answers) == BURST - QUEUE + len(burst.probes)
    assert burst.succeeded == sum(a.status_code == 200 for a in answers) == 1 + QUEUE
    assert burst.observed == burst.succeeded  # refusals are not in the latency histogram (docs/api.md)


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response with a Content-Length, read from ``sock``."""
    return parse_response(read_raw(sock))


def request_head(length: int) -> bytes:
    return (
        "POST /predictions/gated HTTP/1.1\r\nHost: test\r\nContent-Type: text/plain\r\n"
        f"Content-Length: {length}\r\n\r\n"
    ).encode()


def test_shedding_refuses_from_the_head_before_the_body_and_keeps_the_connection(server: Server, gates: Path) -> None:
    big = b"big" + b"x" * (2**20 - 3)  # under max_request_size
    host, port = server.inference.removeprefix("http://").split(":")
    with ThreadPoolExecutor(max_workers=1 + QUEUE) as pool, socket.create_connection((host, int(port)), 10) as sock:
        with worker_held(server, gates, "raw", pool) as primer:
            queued = [pool.submit(post, server, "gated", f"raw/queued-{i}") for i in range(QUEUE)]
            assert wait_until(lambda: scrape(server, "servekit_queue_depth", model_name="gated") == QUEUE)
            sock.sendall(request_head(len(big)))  # the head alone
            status, headers, body = read_response(sock)
            assert_refused(status, headers, body)
            assert headers.get("connection") != "close"
            sock.sendall(big)  # the body the server skips, as a client that sent it anyway
        held = [outcome(future) for future in [primer, *queued]]
        assert [getattr(answer, "status_code", answer) for answer in held] == [200] * (1 + QUEUE)
        sock.sendall(request_head(len(b"raw-after")) + b"raw-after")  # the queue has room again
        status, headers, body = read_response(sock)
    assert status == 200
    answer = json.loads(body)
    assert answer["echo"] == "raw-after"
    assert not [s for s in answer["seen"] if s.startswith("big")]  # the refused body never reached the handler


def test_shedding_refusals_are_logged_once_a_second_and_each_in_the_access_log(server: Server, burst: Burst) -> None:
    rejected = requests_total(server, "rejected")
    access_line = '"POST /predictions/gated HTTP/1.1" 503'

    def summaries() -> list[str]:
        return [line for line in server.log_text().splitlines() if "model gated: refused " in line]

    def logged() -> bool:
        refused = sum(int(line.split("model gated: refused ")[1].split()[0]) for line in summaries())
        return refused == rejected and server.log_text().count(access_line) == rejected

    assert wait_until(logged, timeout=10), server.log_text()[-3000:]
    assert all(" WARNING servekit.batcher: model gated: refused " in line for line in summaries())
    assert all(line.endswith(QUEUE_FULL_MESSAGE) for line in summaries())
    assert len(summaries()) < rejected  # the burst's refusals arrived together and share a line


def read_raw(sock: socket.socket) -> bytes:
    """One HTTP/1.1 response with a Content-Length, as the server wrote it."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"the server closed the connection after {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(next(line for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:"))[15:])
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "the server closed the connection mid-body"
        body += chunk
    return head + b"\r\n\r\n" + body


def closed(sock: socket.socket) -> bool:
    """Whether the server closed ``sock``: end of stream, or a reset (for bytes sent after it closed)."""
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def parse_response(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    """Status, headers (lower-case names) and body of one response as written."""
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
    assert len(body) == int(headers["content-length"])
    return int(status_line.split()[1]), headers, body


def same_but_per_answer(raw: bytes) -> bytes:
    """``raw`` with the values that differ from one answer to the next (date, request id, Retry-After) blanked."""
    return re.sub(rb"(?m)^(date|x-request-id|retry-after): [^\r]*\r$", rb"\1: -\r", raw)


def test_shedding_request_read_whole_is_answered_as_the_parser_would_byte_for_byte(server: Server, gates: Path) -> None:
    """While the port refuses, a request that arrives whole is decided from its bytes without the parser
    (``servekit.api.http.whole_request``): refused, or served on the direct route. Either answer is the parser's,
    byte for byte, with keep-alive and with ``Connection: close``."""
    body = b"raw/whole"
    head = request_head(len(body))
    closing = head.replace(b"Host: test\r\n", b"Host: test\r\nConnection: close\r\n")
    served = head.replace(b"/predictions/gated", b"/predictions/fast")
    host, port = server.inference.removeprefix("http://").split(":")
    answers = {}
    with ThreadPoolExecutor(max_workers=1 + QUEUE) as pool:
        with worker_held(server, gates, "whole", pool):
            queued = [pool.submit(post, server, "gated", f"whole/queued-{i}") for i in range(QUEUE)]
            assert wait_until(lambda: scrape(server, "servekit_queue_depth", model_name="gated") == QUEUE)
            with socket.create_connection((host, int(port)), 10) as sock:
                sock.sendall(head)  # the head alone: the parser's path
                answers["parsed"] = read_raw(sock)
                sock.sendall(body)
                sock.sendall(head + body)  # whole: read from its bytes
                answers["whole"] = read_raw(sock)
                sock.sendall(served)  # the other model, within its capacity, while the port refuses
                time.sleep(0.05)  # the body in a later read: the parser's path
                sock.sendall(body)
                answers["served, parsed"] = read_raw(sock)
                sock.sendall(served + body)
                answers["served, whole"] = read_raw(sock)
            for name, request in (("parsed, close", [closing, body]), ("whole, close", [closing + body])):
                with socket.create_connection((host, int(port)), 10) as sock:
                    sock.sendall(request[0])
                    answers[name] = read_raw(sock)
                    for rest in request[1:]:
                        with contextlib.suppress(OSError):  # the server may have closed already
                            sock.sendall(rest)
                    assert closed(sock)
        assert [outcome(f).status_code for f in queued] == [200] * QUEUE  # type: ignore[union-attr]
    for name, raw in answers.items():
        status, headers, text = parse_response(raw)
        if name.startswith("served"):
            assert (status, json.loads(text)) == (200, {"echo": "raw/whole"})
        else:
            assert_refused(status, headers, text)
    assert same_but_per_answer(answers["served, parsed"]) == same_but_per_answer(answers["served, whole"])
    assert same_but_per_answer(answers["parsed"]) == same_but_per_answer(answers["whole"])
    assert same_but_per_answer(answers["parsed, close"]) == same_but_per_answer(answers["whole, close"])
    assert b"\r\nconnection: close\r\n" in answers["whole, close"]
    assert b"connection: close" not in answers["whole"]


@pytest.mark.parametrize(
    ("raw", "taken"),
    [
        (b"POST /predictions/m HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\nab", True),
        (b"PUT /predictions/m/2.0?x=%41 HTTP/1.1\r\ncontent-length:2 \r\nConnection: close\r\n\r\nab", True),
        (b"POST /predictions/m HTTP/1.1\r\nHost: h\r\n\r\n", True),  # no body
        (b"POST /predictions/m HTTP/1.1\r\nContent-Length: 2\r\n\r\na", False),  # the body is still on its way
        (b"POST /predictions/m HTTP/1.1\r\nContent-Length: 2\r\n\r\nabGET / HTTP/1.1\r\n\r\n", False),  # pipelined
        (b"POST /predictions/m HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nab", False),
        (b"POST /predictions/m HTTP/1.1\r\nContent-Length: +2\r\n\r\nab", False),
        (b"POST /predictions/m HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\n0\r\n\r\n", False),
        (b"POST /predictions/m HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\nab", False),
        (b"POST /predictions/m HTTP/1.1\r\nConnection: upgrade\r\nUpgrade: h2c\r\n\r\n", False),
        (b"POST /predictions/m%2F HTTP/1.1\r\nContent-Length: 0\r\n\r\n", False),  # an escape in the path
        (b"POST /predictions/m HTTP/1.0\r\nContent-Length: 0\r\n\r\n", False),
        (b"GET /predictions/m HTTP/1.1\r\n\r\n", False),
        (b"POST /predictions/m HTTP/1.1\r\nBad Name: x\r\n\r\n", False),
        (b"POST /predictions/m HTTP/1.1\r\nX: \x01\r\n\r\n", False),
        (b"POST /predictions/m HTTP/1.1\r\n folded\r\n\r\n", False),
        (b"POST /predictions/m HTTP/1.1\nContent-Length: 0\n\n", False),
    ],
)
def test_shedding_whole_request_takes_only_plain_whole_requests(raw: bytes, taken: bool) -> None:
    request = whole_request(raw)
    assert (request is not None) == taken
    if request is not None and raw.startswith(b"PUT"):
        assert request == (
            "PUT",
            "/predictions/m/2.0",
            b"x=%41",
            [(b"content-length", b"2"), (b"connection", b"close")],
            False,
            b"ab",
        )
