"""Bytes exactly as sent (issue 14): form values reach the handler as the bytes the client encoded, a content type set
by the handler goes out as set, every response carries ``x-request-id``, a 413 reaches clients that send their whole
body before reading, and request headers are found whatever the case the handler asks with. What TorchServe 0.12
does, observed, is in each test's docstring."""

from __future__ import annotations

import http.client
import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from servekit.handler import RequestProcessor
from tests.helpers import Server, make_archive, running_server

LIMIT = 2_000_000
BOUNDARY = "exact-bytes-boundary"

# Each input's type and bytes (hex), what get_request_header answers, and the request id; the response content type
# is the request's x-set-content-type header when it has one. With ?stream, the answer comes as two chunks.
INSPECT = """
import json


class Inspect:
    def initialize(self, context):
        self.initialized = True

    def handle(self, data, context):
        out = []
        for idx, row in enumerate(data):
            content_type = context.get_all_request_header(idx).get("x-set-content-type")
            if content_type:
                context.set_response_content_type(idx, content_type)
            fields = {}
            for name, value in row.items():
                raw = isinstance(value, (bytes, bytearray))
                fields[name] = [type(value).__name__, value.hex() if raw else value]
            probes = {name: context.get_request_header(idx, name) for name in ("X-Foo", "x-foo", "X-FOO", "Url_Path")}
            answer = json.dumps({"fields": fields, "probes": probes, "id": context.get_request_id(idx)})
            if context.get_all_request_header(idx).get("x-stream"):
                answer = iter([answer, "\\n"])
            out.append(answer)
        return out
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("exact")
    store = root / "store"
    store.mkdir()
    make_archive(store, "inspect", INSPECT, work=root / "work")
    with running_server(root / "run", store, config={"max_request_size": str(LIMIT)}) as srv:
        yield srv


def inspect(server: Server, body: bytes, headers: dict[str, str]) -> dict[str, Any]:
    response = server.post("/predictions/inspect", content=body, headers=headers)
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = json.loads(response.text)
    assert answer["id"] == response.headers["x-request-id"]
    return answer


def multipart(*parts: tuple[str, str | None, bytes]) -> tuple[bytes, dict[str, str]]:
    """A multipart/form-data body from (disposition parameters, content type, data) parts."""
    out = b""
    for disposition, content_type, data in parts:
        out += f"--{BOUNDARY}\r\nContent-Disposition: form-data; {disposition}\r\n".encode()
        out += f"Content-Type: {content_type}\r\n".encode() if content_type else b""
        out += b"\r\n" + data + b"\r\n"
    return out + f"--{BOUNDARY}--\r\n".encode(), {"content-type": f"multipart/form-data; boundary={BOUNDARY}"}


def address(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").split(":")
    return host, int(port)


def test_form_urlencoded_values_reach_the_handler_as_the_percent_decoded_bytes(server: Server) -> None:
    """TorchServe 0.12: each value is a ``bytearray`` of the percent-decoded bytes (``+`` is a space, raw bytes pass
    as they are), names are UTF-8 text, a name without ``=`` has an empty value, the last of repeated names wins."""
    body = b"data=caf%E9&b=two+words&c=%00%FF%2B&raw=\xe9\xff&n%C3%A9=1&empty=&solo&dup=1&dup=2"
    fields = inspect(server, body, {"content-type": "application/x-www-form-urlencoded"})["fields"]
    assert fields == {
        "data": ["bytearray", b"caf\xe9".hex()],
        "b": ["bytearray", b"two words".hex()],
        "c": ["bytearray", b"\x00\xff+".hex()],
        "raw": ["bytearray", b"\xe9\xff".hex()],
        "n\u00e9": ["bytearray", b"1".hex()],
        "empty": ["bytearray", ""],
        "solo": ["bytearray", ""],
        "dup": ["bytearray", b"2".hex()],
    }


def test_form_urlencoded_with_a_charset_parameter_is_still_bytes(server: Server) -> None:
    headers = {"content-type": "application/x-www-form-urlencoded; charset=ISO-8859-1"}
    assert inspect(server, b"data=caf%E9", headers)["fields"] == {"data": ["bytearray", b"caf\xe9".hex()]}


def test_multipart_fields_reach_the_handler_as_the_bytes_sent(server: Server) -> None:
    """TorchServe 0.12: a part without a filename is a ``bytearray`` of its bytes whatever its content type; a file
    part carries its content type without parameters (so ``application/json; charset=utf-8`` is parsed JSON), and
    ``application/octet-stream`` when it names none. No size limit per part but the request's."""
    big = bytes(range(256)) * 5000  # 1.28 MB, over the 1 MB that Starlette's form parser allows a field
    body, headers = multipart(
        ('name="attr"', None, b"\xe9\xff\x00bin"),
        ('name="attr_typed"', "application/json", b'{"b": 2}'),
        ('name="plus"', None, b"a+b%20c"),
        ('name="file"; filename="f.bin"', None, b"\x00\x01"),
        ('name="json_file"; filename="j.json"', "application/json; charset=utf-8", b'{"a": 1}'),
        ('name="text_file"; filename="t.txt"', "text/plain", "caf\u00e9".encode()),
        ('name="big"', None, big),
    )
    fields = inspect(server, body, headers)["fields"]
    assert fields == {
        "attr": ["bytearray", b"\xe9\xff\x00bin".hex()],
        "attr_typed": ["bytearray", b'{"b": 2}'.hex()],
        "plus": ["bytearray", b"a+b%20c".hex()],
        "file": ["bytearray", b"\x00\x01".hex()],
        "json_file": ["dict", {"a": 1}],
        "text_file": ["str", "caf\u00e9"],
        "big": ["bytearray", big.hex()],
    }


@pytest.mark.parametrize("content_type", ["text/plain", "text/html", "text/csv; header=present", "application/x-a"])
@pytest.mark.parametrize("stream", [False, True])
def test_content_type_set_by_the_handler_is_sent_exactly_as_set(
    server: Server, content_type: str, stream: bool
) -> None:
    """TorchServe 0.12 sends ``context.set_response_content_type``'s value as it is: ``text/plain``, not
    ``text/plain; charset=utf-8``."""
    headers = {"x-set-content-type": content_type, **({"x-stream": "1"} if stream else {})}
    response = server.post("/predictions/inspect", content=b"x", headers=headers)
    assert response.status_code == 200
    assert response.headers.get_list("content-type") == [content_type]
    assert (response.headers.get("transfer-encoding") == "chunked") is stream


def test_every_response_carries_x_request_id(server: Server) -> None:
    """TorchServe 0.12: every answer of the three ports carries a fresh ``x-request-id`` (a UUID), errors included
    (but a 413: Netty answers it before the request has an id); for a prediction it is the id the handler sees."""
    answers = [
        httpx.get(server.inference + "/ping"),
        httpx.post(server.inference + "/ping"),
        httpx.get(server.inference + "/nope"),
        httpx.delete(server.inference + "/ping"),
        httpx.post(server.inference + "/predictions/missing", content=b"x"),
        httpx.post(server.inference + "/predictions/inspect/9.9", content=b"x"),
        httpx.post(server.inference + "/v2/models/missing/infer", content=b"{}"),
        httpx.get(server.inference + "/v2/health/live"),
        httpx.get(server.management + "/models"),
        httpx.get(server.management + "/models/missing"),
        httpx.get(server.metrics + "/metrics"),
        httpx.get(server.metrics + "/nope"),
    ]
    ids = [answer.headers.get_list("x-request-id") for answer in answers]
    assert all(len(found) == 1 and len(found[0]) == 36 for found in ids), ids
    assert len({found[0] for found in ids}) == len(ids)
    too_large = httpx.post(server.inference + "/predictions/inspect", content=b"x" * (LIMIT + 1))
    assert too_large.status_code == 413 and "x-request-id" not in too_large.headers


def test_x_request_id_on_the_answer_to_bytes_that_are_not_http(server: Server) -> None:
    """TorchServe 0.12 answers 400 ``Invalid HTTP message.`` with an ``x-request-id``."""
    with socket.create_connection(address(server.inference), timeout=10) as sock:
        sock.sendall(b"\x16\x03\x01 NOT HTTP AT ALL\r\n\r\n")
        reply = sock.recv(65536)
    head = reply.partition(b"\r\n\r\n")[0].lower()
    assert head.startswith(b"http/1.1 400")
    assert head.count(b"\r\nx-request-id: ") == 1


def test_x_request_id_on_a_response_through_the_asgi_path(server: Server) -> None:
    """``Expect: 100-continue`` takes a prediction through ASGI rather than the protocol's direct route."""
    host, port = address(server.inference)
    with socket.create_connection((host, port), timeout=10) as sock:
        head = b"POST /predictions/missing HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n"
        sock.sendall(head)
        reply = sock.recv(65536)
        if reply.startswith(b"HTTP/1.1 100"):
            sock.sendall(b"x")
            reply = reply.partition(b"\r\n\r\n")[2] or sock.recv(65536)
    head = reply.partition(b"\r\n\r\n")[0].lower()
    assert head.startswith(b"http/1.1 404")
    assert head.count(b"\r\nx-request-id: ") == 1


def post_with_http_client(server: Server, body: bytes | Iterator[bytes]) -> http.client.HTTPResponse:
    """http.client writes the whole body before it reads the answer (as Java's HttpClient does)."""
    host, port = address(server.inference)
    connection = http.client.HTTPConnection(host, port, timeout=30)
    headers = {"Content-Type": "application/octet-stream"}
    chunked = not isinstance(body, bytes)
    connection.request("POST", "/predictions/inspect", body=body, headers=headers, encode_chunked=chunked)
    response = connection.getresponse()
    response.read()
    connection.close()
    return response


def test_413_reaches_a_client_that_sends_the_whole_body_before_reading(server: Server) -> None:
    """TorchServe 0.12 answers 413 and reads the rest of the body (then goes on serving the connection); closing
    while the body still arrives resets the connection, and such a client never sees the answer."""
    response = post_with_http_client(server, b"x" * (4 * LIMIT))
    assert response.status == 413
    assert response.getheader("connection") == "close"


def test_413_for_a_chunked_body_reaches_a_client_that_sends_it_all_first(server: Server) -> None:
    def chunks() -> Iterator[bytes]:
        for _ in range(70):
            yield b"y" * 100_000

    response = post_with_http_client(server, chunks())
    assert response.status == 413
    assert response.getheader("connection") == "close"


def test_413_for_a_body_too_large_to_discard_closes_at_once(server: Server) -> None:
    """Discarding is bounded: a body declared far over the limit is answered and the connection closed without
    reading it."""
    host, port = address(server.inference)
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(b"POST /predictions/inspect HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000000\r\n\r\n")
        deadline = time.monotonic() + 5
        received = b""
        while time.monotonic() < deadline:
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
        else:
            pytest.fail("the connection stayed open")
    assert received.startswith(b"HTTP/1.1 413")
    assert server.post("/predictions/inspect", content=b"x").status_code == 200


@pytest.mark.parametrize("path", ["/predictions/inspect", "/v2/models/inspect/infer"])
def test_413_discards_a_chunked_body_only_up_to_a_bound(server: Server, path: str) -> None:
    """A chunked body that never ends is read and dropped up to 16 MiB (here), then the connection closes; on the
    direct route and on a route answered through ASGI (where the connection would otherwise stay open)."""
    host, port = address(server.inference)
    chunk = b"%x\r\n%b\r\n" % (1 << 20, b"z" * (1 << 20))
    sent = 0
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".encode())
        with pytest.raises(OSError):  # reset or broken pipe once the server closes
            while sent < 64 << 20:
                sock.sendall(chunk)
                sent += 1 << 20
            pytest.fail("the server read 64 MiB of a body it refused")
    assert sent < 32 << 20


def test_get_request_header_finds_the_header_whatever_the_case_asked(server: Server) -> None:
    """Handlers written for TorchServe ask in the client's case (TorchServe looks headers up by exact name)."""
    probes = inspect(server, b"x", {"X-Foo": "Bar"})["probes"]
    assert probes == {"X-Foo": "Bar", "x-foo": "Bar", "X-FOO": "Bar", "Url_Path": ""}


def test_request_processor_property_lookup_ignores_case() -> None:
    processor = RequestProcessor({"x-foo": "1", "explain": "False"})
    assert processor.get_request_property("X-Foo") == "1"
    assert processor.get_request_property("EXPLAIN") == "False"
    assert processor.get_request_property("x-bar") is None
