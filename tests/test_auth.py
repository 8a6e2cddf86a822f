"""Token authorization end to end: ``key_file.json`` (0600, TorchServe's shape, strong keys) in the server's working
directory, ``Authorization: Bearer <key>`` per API (401 missing/wrong/expired, 403 the other kind), open ``/ping`` and
metrics, rotation with the API key through ``/token``, expiry, and ``--disable-token-auth``."""

from __future__ import annotations

import json
import re
import stat
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers import Server, make_archive, running_server, stop_process

AUTH_ON = ("--ncs",)
KEY = re.compile(r"[A-Za-z0-9_-]{22,}")  # url-safe base64 of at least 128 bits
OK_HANDLER = """
def handle(data, context):
    if data is None:
        return None
    return ["ok"] * len(data)
"""


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("store")
    make_archive(folder, "m", OK_HANDLER, work=tmp_path_factory.mktemp("work"))
    return folder


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, store: Path) -> Iterator[Server]:
    """One server with token authorization on, shared by the tests that only read or rotate keys."""
    with running_server(tmp_path_factory.mktemp("run"), store, args=AUTH_ON) as running:
        yield running


def key_file(server: Server) -> dict[str, Any]:
    document: dict[str, Any] = json.loads((server.workdir / "key_file.json").read_text())
    return document


def keys(server: Server) -> dict[str, str]:
    return {kind: entry["key"] for kind, entry in key_file(server).items()}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def predict(server: Server, headers: dict[str, str] | None = None) -> httpx.Response:
    return server.post("/predictions/m", content=b"x", headers=headers or {})


def list_models(server: Server, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.get(server.management + "/models", headers=headers or {}, timeout=30)


def rotate(server: Server, kind: str, headers: dict[str, str]) -> httpx.Response:
    return httpx.get(server.management + "/token", params={"type": kind}, headers=headers, timeout=30)


def assert_unauthorized(response: httpx.Response) -> None:
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Bearer")
    body = response.json()
    assert set(body) == {"code", "type", "message"} and body["code"] == 401


def test_auth_key_file_is_private_strong_and_removed_on_stop(tmp_path: Path, store: Path) -> None:
    workdir = tmp_path / "run"
    with running_server(workdir, store, config={"default_workers_per_model": "0"}, args=AUTH_ON) as running:
        path = workdir / "key_file.json"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        document = key_file(running)
        assert set(document) == {"management", "inference", "API"}
        assert set(document["API"]) == {"key"}
        for kind in ("management", "inference"):
            assert set(document[kind]) == {"key", "expiration time"}
            expires = datetime.fromisoformat(document[kind]["expiration time"].replace("Z", "+00:00"))
            assert 59 * 60 < (expires - datetime.now(UTC)).total_seconds() <= 60 * 60  # token_expiration_min=60
        found = keys(running)
        assert all(KEY.fullmatch(key) for key in found.values()), found
        assert len(set(found.values())) == 3
        stop_process(running.process)
        assert running.process.returncode == 0
        assert not path.exists()


@pytest.mark.parametrize(
    "authorization",
    [None, "Bearer", "Basic dXNlcjpwYXNz", "Bearer not-the-key", "Bearer aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"],
)
def test_auth_missing_or_wrong_key_is_401(server: Server, authorization: str | None) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    assert_unauthorized(predict(server, headers))
    assert_unauthorized(list_models(server, headers))


def test_auth_each_api_takes_only_its_own_key(server: Server) -> None:
    found = keys(server)
    response = predict(server, bearer(found["inference"]))
    assert (response.status_code, response.text) == (200, "ok")
    assert list_models(server, bearer(found["management"])).status_code == 200
    for kind in ("management", "API"):
        response = predict(server, bearer(found[kind]))
        assert response.status_code == 403, kind
        assert set(response.json()) == {"code", "type", "message"}
    for kind in ("inference", "API"):
        assert list_models(server, bearer(found[kind])).status_code == 403, kind


def test_auth_ping_and_metrics_need_no_key(server: Server) -> None:
    assert httpx.get(server.inference + "/ping", timeout=10).json() == {"status": "Healthy"}
    assert httpx.get(server.metrics + "/metrics", timeout=10).status_code == 200


def test_auth_api_description_and_its_swagger_page_need_no_key(server: Server) -> None:
    for base in (server.inference, server.management, server.metrics):
        description = httpx.get(base + "/api-description", timeout=10)
        assert description.status_code == 200 and description.json()["openapi"].startswith("3.")
        page = httpx.get(base + "/docs", timeout=10)
        assert page.status_code == 200 and "swagger-ui" in page.text and "/api-description" in page.text
    # the page is open, the API behind it is not
    assert httpx.get(server.management + "/models", timeout=10).status_code == 401


@pytest.mark.parametrize("kind", ["inference", "management"])
def test_auth_token_rotates_a_key_with_the_api_key(server: Server, kind: str) -> None:
    def call(key: str) -> int:
        return (predict if kind == "inference" else list_models)(server, bearer(key)).status_code

    old = keys(server)
    assert call(old[kind]) == 200
    rotated = rotate(server, kind, bearer(old["API"]))
    assert (rotated.status_code, rotated.content) == (200, b"\n")  # TorchServe's answer: the key is in the file
    assert rotated.headers["content-type"] == "application/json"
    new = keys(server)
    assert new[kind] != old[kind] and KEY.fullmatch(new[kind])
    assert {k: v for k, v in new.items() if k != kind} == {k: v for k, v in old.items() if k != kind}
    assert call(old[kind]) == 401
    assert call(new[kind]) == 200


@pytest.mark.parametrize("authorization", [None, "Bearer wrong", "management", "inference"])
def test_auth_token_without_the_api_key_is_refused_and_keeps_the_keys(
    server: Server, authorization: str | None
) -> None:
    before = key_file(server)
    if authorization is None:
        headers = {}
    elif authorization in before:
        headers = bearer(before[authorization]["key"])
    else:
        headers = {"Authorization": authorization}
    response = rotate(server, "inference", headers)
    assert response.status_code == (401 if authorization in (None, "Bearer wrong") else 403)
    assert key_file(server) == before


@pytest.mark.parametrize("kind", ["bogus", "API", ""])
def test_auth_token_with_a_bad_type_is_400(server: Server, kind: str) -> None:
    before = key_file(server)
    response = rotate(server, kind, bearer(before["API"]["key"]))
    assert response.status_code == 400
    assert set(response.json()) == {"code", "type", "message"}
    assert key_file(server) == before


def test_auth_keys_expire_after_token_expiration_min(tmp_path: Path, store: Path) -> None:
    with running_server(tmp_path / "run", store, config={"token_expiration_min": "0.02"}, args=AUTH_ON) as running:
        # The startup keys were issued before the model loaded and may be gone already: take a fresh one.
        assert rotate(running, "inference", bearer(keys(running)["API"])).status_code == 200
        issued = time.time()
        key = keys(running)["inference"]
        assert predict(running, bearer(key)).status_code == 200
        expires = datetime.fromisoformat(key_file(running)["inference"]["expiration time"].replace("Z", "+00:00"))
        assert 0.5 < expires.timestamp() - issued < 1.5  # 0.02 min
        time.sleep(max(0.0, issued + 2 - time.time()))
        assert_unauthorized(predict(running, bearer(key)))
        # The API key never expires.
        assert rotate(running, "inference", bearer(keys(running)["API"])).status_code == 200
        assert predict(running, bearer(keys(running)["inference"])).status_code == 200


def test_auth_disabled_writes_no_key_file_and_needs_no_key(tmp_path: Path, store: Path) -> None:
    with running_server(tmp_path / "run", store, args=("--disable-token-auth", "--ncs")) as running:
        assert not (running.workdir / "key_file.json").exists()
        response = predict(running)
        assert (response.status_code, response.text) == (200, "ok")
        assert list_models(running).status_code == 200
        assert predict(running, bearer("anything")).status_code == 200
