"""Hostile HTTP against a real server: slow loris, oversized and chunked bodies, huge forms, garbage requests,
wrong methods. Each gets a clear answer or a closed connection, and normal clients keep being served."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.helpers import Server, make_archive, running_server

ECHO = """
def handle(data, context):
    if data is None:
        return None
    return [sorted(row) for row in data]
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("hostile")
    store = root / "store"
    store.mkdir()
    make_archive(store, "echo", ECHO, work=root / "work")
    config = {"http_header_timeout": "1", "http_body_timeout": "2", "max_request_size": "50000"}
    with running_server(root / "run", store, config=config) as srv:
        yield srv


def connect(server: Server) -> socket.socket:
    host, port = server.inference.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    return sock


def closed_within(sock: socket.socket, seconds: float, trickle: bytes = b"") -> bool:
    """True if the server closes the connection within ``seconds`` while we trickle ``trickle`` byte by byte."""
    deadline = time.monotonic() + seconds
    sock.settimeout(0.25)
    for byte in trickle or b"\0" * 1000:
        if time.monotonic() > deadline:
            return False
        try:
            if trickle:
                sock.send(bytes([byte]))
            if sock.recv(4096) == b"":
                return True
        except TimeoutError:
            continue
        except (ConnectionResetError, BrokenPipeError):
            return True
    return False


def assert_serving(server: Server) -> None:
    response = server.post("/predictions/echo", content=b"x")
    assert response.status_code == 200 and response.json() == ["body"]


def test_hostile_http_idle_connection_without_a_request_is_closed(server: Server) -> None:
    with connect(server) as sock:
        assert closed_within(sock, 4)
    assert_serving(server)


def test_hostile_http_headers_trickled_past_the_header_deadline_are_cut(server: Server) -> None:
    with connect(server) as sock:
        assert closed_within(sock, 4, b"POST /predictions/echo HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100)
    assert_serving(server)


def test_hostile_http_body_trickled_past_the_body_deadline_is_cut(server: Server) -> None:
    with connect(server) as sock:
        sock.sendall(b"POST /predictions/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n")
        assert closed_within(sock, 5, b"b" * 200)
    assert_serving(server)


def test_hostile_http_many_slow_connections_do_not_starve_normal_clients(server: Server) -> None:
    slow = [connect(server) for _ in range(100)]
    try:
        for sock in slow:
            sock.sendall(b"POST /predictions/echo HTTP/1.1\r\nHost: x\r\n")
        for _ in range(10):
            assert_serving(server)
    finally:
        for sock in slow:
            sock.close()


def test_hostile_http_chunked_body_over_the_limit_is_413(server: Server) -> None:
    def chunks() -> Iterator[bytes]:
        for _ in range(100):
            yield b"z" * 1000

    response = server.post("/predictions/echo", content=chunks())
    assert response.status_code == 413 and response.content == b""  # TorchServe's 413 has no body
    assert_serving(server)


def test_hostile_http_form_with_too_many_fields_is_400(server: Server) -> None:
    response = server.post("/predictions/echo", data={f"f{i}": "v" for i in range(2000)})
    assert response.status_code == 400
    assert "form" in response.json()["message"].lower()
    assert_serving(server)


def test_hostile_http_garbage_request_is_400_and_server_keeps_serving(server: Server) -> None:
    with connect(server) as sock:
        sock.sendall(b"\x16\x03\x01 NOT HTTP AT ALL\r\n\r\n")
        reply = sock.recv(4096)
    assert reply.startswith(b"HTTP/1.1 400")
    assert_serving(server)


def test_hostile_http_wrong_method_is_405_json(server: Server) -> None:
    response = httpx.delete(server.inference + "/ping")
    assert response.status_code == 405
    assert response.json()["code"] == 405
    assert httpx.delete(server.management + "/models").status_code == 405
