"""The management API end to end: register (from the model store, a folder, or an allowed URL served by a local
http.server), describe, list, scale, versions and set-default, unregister, against a real server with real worker
processes checked in the process table."""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from tests.helpers import Server, children_of, free_port, make_archive, running_server

# Answers the model version it was archived with; a body "sleepN" makes it take N seconds first.
VERSION_HANDLER = """
import time


def handle(data, context):
    if data is None:
        return None
    for row in data:
        body = row.get("body")
        if isinstance(body, (bytes, bytearray)):
            body = body.decode()
        if isinstance(body, str) and body.startswith("sleep"):
            time.sleep(float(body[5:]))
    return [context.manifest["model"]["modelVersion"]] * len(data)
"""

BROKEN_HANDLER = """
class Broken:
    def initialize(self, context):
        raise RuntimeError("weights are corrupt: boom-42")

    def handle(self, data, context):
        return ["never"] * len(data)
"""


MAX_DOWNLOAD = 100_000
BIG = 3 * MAX_DOWNLOAD
DOWNLOAD_TIMEOUT_S = 2


def build(store: Path, work: Path, file_name: str, model: str, handler: str, **kwargs: str) -> Path:
    """An archive of ``model`` stored as ``store/file_name`` (make_archive names files after the model)."""
    out = work / f"out-{file_name}"
    out.mkdir(parents=True)
    built = make_archive(out, model, handler, work=work / f"w-{file_name}", **kwargs)
    return Path(shutil.move(built, store / file_name))


def call(server: Server, method: str, path: str, **kwargs: object) -> httpx.Response:
    return httpx.request(method, server.management + path, timeout=60, **kwargs)  # type: ignore[arg-type]


def predict(server: Server, path: str, body: str = "x") -> httpx.Response:
    return httpx.post(server.inference + path, content=body, headers={"content-type": "text/plain"}, timeout=60)


def workers(server: Server, name: str, version: str | None = None) -> list[dict[str, object]]:
    response = call(server, "GET", f"/models/{name}" + (f"/{version}" if version else ""))
    assert response.status_code == 200, response.text
    found: list[dict[str, object]] = response.json()[0]["workers"]
    return found


def worker_pids(server: Server, name: str, version: str | None = None) -> set[int]:
    return {int(str(w["pid"])) for w in workers(server, name, version)}


def all_worker_pids(server: Server) -> set[int]:
    pids: set[int] = set()
    for entry in call(server, "GET", "/models").json()["models"]:
        for model in call(server, "GET", f"/models/{entry['modelName']}/all").json():
            pids |= {int(w["pid"]) for w in model["workers"]}
    return pids


def cwd_of(pid: int) -> Path:
    return Path(os.readlink(f"/proc/{pid}/cwd"))


def processes_in(folder: Path) -> list[int]:
    """Every process on the machine whose working directory is inside ``folder``, whoever its parent."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if cwd_of(int(entry.name)).is_relative_to(folder):
                    found.append(int(entry.name))
    return found


def eventually(check: Callable[[], bool], timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return check()


def assert_error(response: httpx.Response, status: int, *words: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["code"] == status
    for word in words:
        assert word in body["message"], body


@dataclass
class Remote:
    """Two local HTTP servers: ``allowed`` (its /ok/ paths admitted by allowed_urls) and ``other`` (not admitted);
    ``closed`` is a port that allowed_urls admits but where nothing listens."""

    allowed: int
    other: int
    closed: int
    files: dict[str, bytes]
    hits: list[tuple[int, str]] = field(default_factory=list)

    def url(self, path: str, port: int | None = None) -> str:
        return f"http://127.0.0.1:{port or self.allowed}{path}"


@contextlib.contextmanager
def serve_remote(remote: Remote) -> Iterator[None]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            port = int(self.connection.getsockname()[1])
            remote.hits.append((port, self.path))
            name = self.path.rsplit("/", 1)[-1]
            if self.path.startswith("/ok/redirect/"):  # to the other server, which allowed_urls does not admit
                self.send_response(302)
                self.send_header("Location", remote.url(f"/ok/{name}", remote.other))
                self.send_header("Content-Length", "0")
                self.end_headers()
            elif self.path.startswith("/ok/hop/"):  # to an admitted URL
                self.send_response(302)
                self.send_header("Location", f"/ok/{name}")
                self.send_header("Content-Length", "0")
                self.end_headers()
            elif self.path.startswith("/ok/stream/"):  # no Content-Length: the body ends when the connection does
                self.send_response(200)
                self.end_headers()
                with contextlib.suppress(OSError):
                    for _ in range(BIG // 1000):
                        self.wfile.write(b"x" * 1000)
            elif self.path.startswith("/ok/slow/"):  # half now, the rest after download_timeout
                self.send_response(200)
                self.send_header("Content-Length", str(len(remote.files[name])))
                self.end_headers()
                with contextlib.suppress(OSError):
                    self.wfile.write(remote.files[name][:100])
                    self.wfile.flush()
                    time.sleep(DOWNLOAD_TIMEOUT_S + 1.5)
                    self.wfile.write(remote.files[name][100:])
            elif name in remote.files:
                self.send_response(200)
                self.send_header("Content-Length", str(len(remote.files[name])))
                self.end_headers()
                self.wfile.write(remote.files[name])
            else:
                self.send_error(404)

        def log_message(self, format: str, *args: object) -> None:
            pass

    servers = [ThreadingHTTPServer(("127.0.0.1", 0), Handler) for _ in range(2)]
    remote.allowed, remote.other = (int(s.server_address[1]) for s in servers)
    threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in servers]
    for thread in threads:
        thread.start()
    try:
        yield
    finally:
        for s in servers:
            s.shutdown()
            s.server_close()
        for thread in threads:
            thread.join()


@pytest.fixture(scope="module")
def remote(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Remote]:
    root = tmp_path_factory.mktemp("remote")
    files = root / "files"
    files.mkdir()
    build(files, root / "work", "dl.mar", "dl", VERSION_HANDLER, version="3.1")
    archive = (files / "dl.mar").read_bytes()
    assert len(archive) < MAX_DOWNLOAD
    remote = Remote(
        0,
        0,
        free_port(),
        {"dl.mar": archive, "dl_copy.mar": archive, "junk.mar": b"not a zip archive", "big.mar": b"x" * BIG},
    )
    with serve_remote(remote):
        yield remote


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("store")
    store, work = root / "store", root / "work"
    store.mkdir()
    build(store, work, "ver.mar", "ver", VERSION_HANDLER, version="1.0")
    build(store, work, "ver_v2.mar", "ver", VERSION_HANDLER, version="2.0")
    build(store, work, "echo.mar", "echo", VERSION_HANDLER)
    build(store, work, "folder", "folder", VERSION_HANDLER, fmt="no-archive")
    build(store, work, "broken.mar", "broken", BROKEN_HANDLER)
    build(store, work, "idle.mar", "idle", VERSION_HANDLER, config="minWorkers: 0\n")
    return store


@pytest.fixture(scope="module")
def server(store: Path, remote: Remote, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    config = {
        "allowed_urls": f"http://127.0.0.1:{remote.allowed}/ok/.*, http://127.0.0.1:{remote.closed}/ok/.*",
        "max_download_size": str(MAX_DOWNLOAD),
        "download_timeout": str(DOWNLOAD_TIMEOUT_S),
        "unregister_model_timeout": "30",
    }
    args = ("--disable-token-auth", "--ncs", "--enable-model-api")
    with running_server(tmp_path_factory.mktemp("run"), store, ("ver.mar",), config, args) as srv:
        yield srv


def test_management_register_and_delete_are_405_without_model_api(store: Path, tmp_path: Path) -> None:
    with running_server(tmp_path, store, ("idle.mar",)) as server:
        assert_error(call(server, "POST", "/models", params={"url": "echo.mar"}), 405, "--enable-model-api")
        assert_error(call(server, "DELETE", "/models/idle"), 405, "--enable-model-api")
        assert call(server, "GET", "/models/echo").status_code == 404
        # describing and scaling stay allowed, and the model is still there
        assert call(server, "GET", "/models/idle").json()[0]["modelName"] == "idle"
        scaled = call(server, "PUT", "/models/idle", params={"min_worker": "0", "synchronous": "true"})
        assert scaled.json() == {"status": "Workers scaled to 0 for model: idle"}


def test_management_describe_has_torchserve_fields(server: Server) -> None:
    response = call(server, "GET", "/models/ver")
    assert response.status_code == 200, response.text
    [model] = response.json()
    assert model["modelName"] == "ver" and model["modelVersion"] == "1.0"
    assert model["modelUrl"] == "ver.mar" and model["runtime"] == "python"
    assert model["minWorkers"] == 1 and model["maxWorkers"] == 1
    assert model["batchSize"] == 1 and model["maxBatchDelay"] == 100
    assert model["loadedAtStartup"] is True
    [worker] = model["workers"]
    assert worker["id"] and worker["status"] == "READY" and worker["gpu"] is False
    assert worker["startTime"].endswith("Z") and worker["memoryUsage"] > 0
    assert worker["pid"] in children_of(server.process.pid)
    assert call(server, "GET", "/models/ver/1.0").json() == call(server, "GET", "/models/ver").json()
    assert [m["modelVersion"] for m in call(server, "GET", "/models/ver/all").json()] == ["1.0"]


def test_management_unknown_model_or_version_is_404(server: Server) -> None:
    assert_error(call(server, "GET", "/models/nope"), 404, "nope")
    assert_error(call(server, "GET", "/models/nope/all"), 404, "nope")
    assert_error(call(server, "GET", "/models/ver/9.9"), 404, "9.9")
    assert_error(call(server, "PUT", "/models/nope", params={"min_worker": "1"}), 404)
    assert_error(call(server, "PUT", "/models/ver/9.9", params={"min_worker": "1"}), 404, "9.9")
    assert_error(call(server, "PUT", "/models/ver/9.9/set-default"), 404, "9.9")
    assert_error(call(server, "PUT", "/models/nope/1.0/set-default"), 404)
    assert_error(call(server, "DELETE", "/models/nope"), 404)
    assert_error(call(server, "DELETE", "/models/ver/9.9"), 404, "9.9")


@pytest.mark.parametrize(
    ("params", "parameter"),
    [
        ({"url": "echo.mar", "batch_size": "dd"}, "batch_size"),
        ({"url": "echo.mar", "batch_size": "0"}, "batch_size"),
        ({"url": "echo.mar", "initial_workers": "-1"}, "initial_workers"),
        ({"url": "echo.mar", "max_batch_delay": "soon"}, "max_batch_delay"),
        ({"url": "echo.mar", "response_timeout": "x"}, "response_timeout"),
        ({"url": "echo.mar", "startup_timeout": "-5"}, "startup_timeout"),
        ({"url": "echo.mar", "synchronous": "maybe"}, "synchronous"),
        ({"url": "echo.mar", "runtime": "java"}, "runtime"),
        ({}, "url"),
        ({"url": "/etc/passwd"}, "outside the model store"),
    ],
)
def test_management_register_rejects_bad_parameters_naming_them(
    server: Server, params: dict[str, str], parameter: str
) -> None:
    assert_error(call(server, "POST", "/models", params=params), 400, parameter)
    assert call(server, "GET", "/models/echo").status_code == 404


def test_management_register_of_missing_archive_is_404_and_registers_nothing(server: Server) -> None:
    assert_error(call(server, "POST", "/models", params={"url": "missing.mar"}), 404, "missing.mar")
    assert call(server, "GET", "/models/missing").status_code == 404


@pytest.mark.parametrize(
    ("params", "parameter"),
    [
        ({"min_worker": "-1"}, "min_worker"),
        ({"min_worker": "dd"}, "min_worker"),
        ({"min_worker": "3", "max_worker": "2"}, "max_worker"),
        ({"min_worker": "1", "max_worker": "x"}, "max_worker"),
        ({"min_worker": "1", "synchronous": "sometimes"}, "synchronous"),
    ],
)
def test_management_scale_rejects_bad_parameters_naming_them(
    server: Server, params: dict[str, str], parameter: str
) -> None:
    before = call(server, "GET", "/models/ver").json()
    response = call(server, "PUT", "/models/ver", params=params)
    assert_error(response, 400, parameter)
    after = call(server, "GET", "/models/ver").json()
    assert [(m["minWorkers"], len(m["workers"])) for m in after] == [(m["minWorkers"], 1) for m in before]


def test_management_register_with_query_or_json_applies_settings(server: Server) -> None:
    by_query = call(
        server,
        "POST",
        "/models",
        params={
            "url": "echo.mar",
            "model_name": "echo_q",
            "batch_size": "4",
            "max_batch_delay": "7",
            "initial_workers": "2",
            "response_timeout": "33",
            "startup_timeout": "44",
            "runtime": "python",
            "synchronous": "true",
        },
    )
    assert by_query.status_code == 200, by_query.text
    assert by_query.json() == {"status": 'Model "echo_q" Version: 1.0 registered with 2 initial workers'}
    body = {
        "url": "echo.mar",
        "model_name": "echo_j",
        "batch_size": 4,
        "max_batch_delay": 7,
        "initial_workers": 0,
        "response_timeout": 33,
        "startup_timeout": 44,
        "synchronous": True,
    }
    by_json = call(server, "POST", "/models", json=body)
    assert by_json.status_code == 200, by_json.text
    assert by_json.json() == {
        "status": 'Model "echo_j" Version: 1.0 registered with 0 initial workers. '
        "Use scale workers API to add workers for the model."
    }
    try:
        for name, n in (("echo_q", 2), ("echo_j", 0)):
            [model] = call(server, "GET", f"/models/{name}").json()
            assert model["modelName"] == name and model["modelUrl"] == "echo.mar"
            assert (model["batchSize"], model["maxBatchDelay"], model["minWorkers"]) == (4, 7, n)
            assert (model["responseTimeout"], model["startupTimeout"]) == (33, 44)
            assert model["loadedAtStartup"] is False
            assert len(model["workers"]) == n and all(w["status"] == "READY" for w in model["workers"])
        assert predict(server, "/predictions/echo_q").text == "1.0"
        assert_error(predict(server, "/predictions/echo_j"), 503, "echo_j")
        listed = [m["modelName"] for m in call(server, "GET", "/models").json()["models"]]
        assert {"echo_q", "echo_j", "ver"} <= set(listed) and listed == sorted(listed)
        dup = call(server, "POST", "/models", params={"url": "echo.mar", "model_name": "echo_q"})
        assert_error(dup, 409, "1.0", "echo_q")
    finally:
        for name in ("echo_q", "echo_j"):
            assert call(server, "DELETE", f"/models/{name}").json() == {"status": f'Model "{name}" unregistered'}
    assert call(server, "GET", "/models/echo_q").status_code == 404


def test_management_list_pages_with_next_page_token(server: Server) -> None:
    names = ["page_a", "page_b", "page_c"]
    for name in names:
        params = {"url": "echo.mar", "model_name": name, "initial_workers": "0"}
        assert call(server, "POST", "/models", params=params).status_code == 200
    try:
        everything = call(server, "GET", "/models").json()
        assert "nextPageToken" not in everything
        seen: list[str] = []
        token = "0"
        for _ in range(20):
            page = call(server, "GET", "/models", params={"limit": "2", "next_page_token": token}).json()
            assert len(page["models"]) <= 2
            seen += [m["modelName"] for m in page["models"]]
            if "nextPageToken" not in page:
                break
            token = page["nextPageToken"]
        assert seen == [m["modelName"] for m in everything["models"]]
        assert set(names) <= set(seen)
        page = next(m for m in everything["models"] if m["modelName"] == "page_a")
        assert page == {"modelName": "page_a", "modelUrl": "echo.mar"}
    finally:
        for name in names:
            call(server, "DELETE", f"/models/{name}")


def test_management_versions_served_at_once_with_default_routing(server: Server) -> None:
    params = {"url": "ver_v2.mar", "initial_workers": "1", "synchronous": "false"}
    registered = call(server, "POST", "/models", params=params)
    assert registered.status_code == 202, registered.text
    assert registered.json() == {"status": "Processing worker updates..."}
    try:
        assert eventually(lambda: [w["status"] for w in workers(server, "ver", "2.0")] == ["READY"])
        assert [m["modelVersion"] for m in call(server, "GET", "/models/ver/all").json()] == ["1.0", "2.0"]
        assert predict(server, "/predictions/ver").text == "1.0"  # the first version stays the default
        assert predict(server, "/predictions/ver/2.0").text == "2.0"
        assert predict(server, "/predictions/ver/1.0").text == "1.0"
        assert worker_pids(server, "ver", "1.0").isdisjoint(worker_pids(server, "ver", "2.0"))
        assert_error(call(server, "POST", "/models", params={"url": "ver_v2.mar"}), 409, "2.0")

        made_default = call(server, "PUT", "/models/ver/2.0/set-default")
        assert made_default.status_code == 200, made_default.text
        assert made_default.json() == {"status": 'Default version successfully updated for model "ver" to "2.0"'}
        assert predict(server, "/predictions/ver").text == "2.0"
        assert call(server, "GET", "/models/ver").json()[0]["modelVersion"] == "2.0"
        assert_error(call(server, "DELETE", "/models/ver/2.0"), 403, "default")
        assert_error(call(server, "DELETE", "/models/ver"), 403, "default")
        assert predict(server, "/predictions/ver/2.0").text == "2.0"  # a refused delete changes nothing
    finally:
        assert call(server, "PUT", "/models/ver/1.0/set-default").status_code == 200
    v2_pids = worker_pids(server, "ver", "2.0")
    scaled = call(server, "PUT", "/models/ver/2.0", params={"min_worker": "0", "max_worker": "3"})
    assert scaled.status_code == 202 and scaled.json() == {"status": "Processing worker updates..."}
    assert eventually(lambda: workers(server, "ver", "2.0") == [])
    [model] = call(server, "GET", "/models/ver/2.0").json()
    assert (model["minWorkers"], model["maxWorkers"]) == (0, 3)
    assert eventually(lambda: v2_pids.isdisjoint(children_of(server.process.pid)))
    assert predict(server, "/predictions/ver").text == "1.0"
    assert call(server, "DELETE", "/models/ver/2.0").status_code == 200
    assert_error(call(server, "GET", "/models/ver/2.0"), 404, "2.0")
    assert_error(predict(server, "/predictions/ver/2.0"), 404, "2.0")
    assert predict(server, "/predictions/ver").text == "1.0"


def test_management_scale_down_lets_busy_workers_finish_and_zero_refuses_promptly(server: Server) -> None:
    params = {"url": "echo.mar", "model_name": "busy", "initial_workers": "2"}
    assert call(server, "POST", "/models", params=params).status_code == 200
    try:
        before = worker_pids(server, "busy")
        with ThreadPoolExecutor(2) as pool:
            running = [pool.submit(predict, server, "/predictions/busy", "sleep1.5") for _ in range(2)]
            time.sleep(0.5)  # both are on a worker now
            scaled = call(server, "PUT", "/models/busy", params={"min_worker": "1", "synchronous": "true"})
            assert scaled.json() == {"status": "Workers scaled to 1 for model: busy"}
            assert not any(f.done() for f in running), "scaling down neither waits for nor cuts busy workers"
            results = [f.result() for f in running]
        assert [(r.status_code, r.text) for r in results] == [(200, "1.0"), (200, "1.0")]
        assert len(worker_pids(server, "busy")) == 1
        assert eventually(lambda: len(before & set(children_of(server.process.pid))) == 1)

        [pid] = worker_pids(server, "busy")
        with ThreadPoolExecutor(1) as pool:
            running = [pool.submit(predict, server, "/predictions/busy", "sleep1.5")]
            time.sleep(0.5)
            scaled = call(server, "PUT", "/models/busy", params={"min_worker": "0", "synchronous": "true"})
            assert scaled.status_code == 200, scaled.text
            started = time.monotonic()
            refused = predict(server, "/predictions/busy")
            assert time.monotonic() - started < 1.0
            assert_error(refused, 503, "busy")
            assert refused.headers["retry-after"]
            assert not running[0].done()
            assert (running[0].result().status_code, running[0].result().text) == (200, "1.0")
        assert eventually(lambda: pid not in children_of(server.process.pid))
        assert workers(server, "busy") == []
    finally:
        call(server, "DELETE", "/models/busy")


def test_management_unregister_drains_and_leaves_no_process_or_staging(server: Server, store: Path) -> None:
    params = {"url": "echo.mar", "model_name": "drain", "initial_workers": "1"}
    assert call(server, "POST", "/models", params=params).status_code == 200
    [pid] = worker_pids(server, "drain")
    model_dir = cwd_of(pid)
    staging = next(p for p in model_dir.parents if p.name.startswith("servekit-model-"))
    assert model_dir.is_dir()
    with ThreadPoolExecutor(4) as pool:
        queued = [pool.submit(predict, server, "/predictions/drain", "sleep0.7") for _ in range(3)]
        time.sleep(0.3)  # one runs, two wait in the queue
        deleting: Future[httpx.Response] = pool.submit(call, server, "DELETE", "/models/drain")
        time.sleep(0.3)
        late = predict(server, "/predictions/drain")
        assert late.status_code in (404, 503), late.text  # no longer admitted
        assert deleting.result().json() == {"status": 'Model "drain" unregistered'}
        results = [f.result() for f in queued]
    assert results[0].status_code == 200 and results[0].text == "1.0"
    # queued requests are finished (or failed with 503 if the drain timed out), never lost
    assert all((r.status_code, r.text) == (200, "1.0") or r.status_code == 503 for r in results)
    assert pid not in children_of(server.process.pid) and processes_in(staging) == []
    assert not model_dir.exists() and not staging.exists()
    assert call(server, "GET", "/models/drain").status_code == 404
    assert (store / "echo.mar").is_file()  # the archive it came from stays in the store


def test_management_failed_sync_register_is_500_and_keeps_the_model_without_workers(server: Server) -> None:
    """TorchServe's answer, and its model left registered with no workers; the handler's error is in the log."""
    before = set(children_of(server.process.pid))
    staging_before = set(server.workdir.glob("servekit-model-*"))
    response = call(server, "POST", "/models", params={"url": "broken.mar", "initial_workers": "1"})
    try:
        assert response.status_code == 500, response.text
        message = "Failed to start workers for model broken version: 1.0"
        assert response.json() == {"code": 500, "type": "InternalServerException", "message": message}
        assert "weights are corrupt: boom-42" in server.log_text()
        assert workers(server, "broken") == []
        assert set(children_of(server.process.pid)) <= before
    finally:
        assert call(server, "DELETE", "/models/broken").status_code == 200
    assert set(server.workdir.glob("servekit-model-*")) == staging_before


def test_management_sync_scale_up_of_broken_model_is_500(server: Server) -> None:
    response = call(server, "POST", "/models", params={"url": "broken.mar", "initial_workers": "0"})
    assert response.status_code == 200, response.text
    assert "Use scale workers API to add workers for the model" in response.json()["status"]
    try:
        before = set(children_of(server.process.pid))
        scaled = call(server, "PUT", "/models/broken", params={"min_worker": "1", "synchronous": "true"})
        assert_error(scaled, 500, "weights are corrupt: boom-42")
        assert set(children_of(server.process.pid)) <= before
        assert workers(server, "broken") == []
        # with no worker alive, a request is refused at once rather than queued forever
        refused = httpx.post(server.inference + "/predictions/broken", content=b"x", timeout=10)
        assert refused.status_code == 503, refused.text
    finally:
        assert call(server, "DELETE", "/models/broken").status_code == 200


def test_management_folder_model_registers_and_unregister_keeps_the_folder(server: Server, store: Path) -> None:
    response = call(server, "POST", "/models", params={"url": "folder", "initial_workers": "1"})
    assert response.status_code == 200, response.text
    [pid] = worker_pids(server, "folder")
    assert cwd_of(pid).is_relative_to((store / "folder").resolve())
    assert predict(server, "/predictions/folder").text == "1.0"
    assert call(server, "DELETE", "/models/folder").status_code == 200
    assert (store / "folder").is_dir() and any((store / "folder").rglob("MANIFEST.json"))
    assert pid not in children_of(server.process.pid)


def test_management_download_from_allowed_url_registers_serves_and_unregister_removes_it(
    server: Server, store: Path, remote: Remote
) -> None:
    url = remote.url("/ok/hop/dl.mar")  # redirected to /ok/dl.mar, which allowed_urls admits too
    response = call(server, "POST", "/models", params={"url": url, "initial_workers": "1"})
    assert response.status_code == 200, response.text
    assert (remote.allowed, "/ok/dl.mar") in remote.hits
    assert (store / "dl.mar").read_bytes() == remote.files["dl.mar"]
    [model] = call(server, "GET", "/models/dl").json()
    assert model["modelUrl"] == url and model["modelVersion"] == "3.1"
    assert predict(server, "/predictions/dl").text == "3.1"

    again = call(server, "POST", "/models", params={"url": remote.url("/ok/dl.mar"), "model_name": "dl2"})
    assert_error(again, 409, "dl.mar")
    assert (store / "dl.mar").is_file() and predict(server, "/predictions/dl").text == "3.1"
    # the same model version under another file name: downloaded, refused as a duplicate, removed again
    copy = call(server, "POST", "/models", params={"url": remote.url("/ok/dl_copy.mar")})
    assert_error(copy, 409, "3.1")
    assert not (store / "dl_copy.mar").exists()

    assert call(server, "DELETE", "/models/dl").status_code == 200
    assert not (store / "dl.mar").exists()
    assert not [p for p in store.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize(
    ("path", "port", "words"),
    [
        ("/bad/dl.mar", "allowed", ("does not match",)),  # not admitted: never fetched
        ("/ok/dl.mar", "other", ("does not match",)),
        ("/ok/../bad/dl.mar", "allowed", ()),  # admitted as written, but it names /bad/dl.mar
        ("/ok/redirect/dl.mar", "allowed", ("does not match",)),  # admitted, but redirected to the other port
        ("/ok/missing.mar", "allowed", ("404",)),
        ("/ok/junk.mar", "allowed", ()),  # fetched, but not an archive: removed again
        ("/ok/big.mar", "allowed", (str(MAX_DOWNLOAD),)),  # Content-Length over max_download_size
        ("/ok/stream/big.mar", "allowed", (str(MAX_DOWNLOAD),)),  # no Content-Length, body over the limit
        ("/ok/slow/dl.mar", "allowed", ()),  # slower than download_timeout
        ("/ok/dl.mar", "closed", ()),  # admitted, but nothing answers
    ],
)
def test_management_download_refusals_are_400_and_write_nothing(
    server: Server, store: Path, remote: Remote, path: str, port: str, words: tuple[str, ...]
) -> None:
    listing = sorted(p.name for p in store.iterdir())
    hits = len(remote.hits)
    url = f"http://127.0.0.1:{getattr(remote, port)}{path}"
    try:
        response = call(server, "POST", "/models", params={"url": url})
        new_hits = remote.hits[hits:]
        assert not [h for h in new_hits if h[0] == remote.other or h[1].startswith("/bad/")], new_hits
        assert_error(response, 400, *words)
        assert sorted(p.name for p in store.iterdir()) == listing
        if path.startswith("/ok/redirect/"):
            assert new_hits == [(remote.allowed, path)]  # the redirect target was never requested
        assert call(server, "GET", "/models/dl").status_code == 404
    finally:  # what a failure here registered must not break the next case
        if call(server, "GET", "/models/dl").status_code == 200:
            call(server, "DELETE", "/models/dl")
        (store / "dl.mar").unlink(missing_ok=True)


def test_management_download_with_user_info_is_400(server: Server, store: Path, remote: Remote) -> None:
    listing = sorted(p.name for p in store.iterdir())
    hits = len(remote.hits)
    for url in (
        f"http://127.0.0.1:{remote.allowed}@127.0.0.1:{remote.other}/ok/dl.mar",
        f"http://127.0.0.1:{remote.allowed}@evil.invalid/ok/dl.mar",
        f"http://user:pw@127.0.0.1:{remote.allowed}/ok/dl.mar",
    ):
        assert_error(call(server, "POST", "/models", params={"url": url}), 400)
    assert remote.hits[hits:] == []
    assert sorted(p.name for p in store.iterdir()) == listing


@pytest.mark.slow  # 10 worker starts, each importing torch
def test_management_scaling_20_times_while_serving_loses_nothing(server: Server) -> None:
    params = {"url": "echo.mar", "model_name": "churn", "initial_workers": "1", "max_batch_delay": "5"}
    assert call(server, "POST", "/models", params=params).status_code == 200
    try:
        [first] = worker_pids(server, "churn")
        staging = next(p for p in cwd_of(first).parents if p.name.startswith("servekit-model-"))
        stop = threading.Event()
        outcomes: list[tuple[int, str]] = []

        def client() -> None:
            with httpx.Client(timeout=60) as http:
                while not stop.is_set():
                    r = http.post(server.inference + "/predictions/churn", content=b"x")
                    outcomes.append((r.status_code, r.text))
                    time.sleep(0.01)  # leave the two cores to the workers being started

        thread = threading.Thread(target=client)
        thread.start()
        try:
            counts = [2, 1] * 10
            for n in counts:
                scaled = call(server, "PUT", "/models/churn", params={"min_worker": n, "synchronous": "true"})
                assert scaled.status_code == 200, scaled.text
        finally:
            stop.set()
            thread.join(60)
        failures = [o for o in outcomes if o != (200, "1.0")]
        assert failures == [] and len(outcomes) > 20, (failures[:5], len(outcomes))
        assert len(workers(server, "churn")) == counts[-1]

        # the workers of this model anywhere in the process table (an orphan would have another parent)
        assert eventually(lambda: len(processes_in(staging)) == counts[-1]), processes_in(staging)
        assert set(processes_in(staging)) == worker_pids(server, "churn")
        assert eventually(lambda: set(children_of(server.process.pid)) == all_worker_pids(server))
    finally:
        call(server, "DELETE", "/models/churn")


def open_fds(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


def test_management_register_infer_unregister_cycles_leave_no_processes(server: Server) -> None:
    baseline = set(children_of(server.process.pid))
    staging_before = set(server.workdir.glob("servekit-model-*"))
    fds_before = open_fds(server.process.pid)
    for cycle in range(3):
        params = {"url": "echo.mar", "model_name": "cycle", "initial_workers": "1"}
        assert call(server, "POST", "/models", params=params).status_code == 200
        assert len(worker_pids(server, "cycle")) == 1
        assert predict(server, "/predictions/cycle").text == "1.0", cycle
        assert call(server, "DELETE", "/models/cycle").status_code == 200
        assert set(children_of(server.process.pid)) == baseline
    assert set(server.workdir.glob("servekit-model-*")) == staging_before
    assert set(children_of(server.process.pid)) == all_worker_pids(server)
    # sockets to the workers and archive files are closed (the last client connection's close is asynchronous)
    assert eventually(lambda: open_fds(server.process.pid) <= fds_before), open_fds(server.process.pid)
