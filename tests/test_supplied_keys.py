"""Token authorization with keys the operator supplies (``key_file``, or ``SERVEKIT_<KIND>_KEY``), for a fleet: two
servers given the same file accept the same keys, rotation is refused, nothing is written or removed, no key reaches
the log or the snapshot; key material that is missing, unreadable or malformed stops the start (exit code 1) with a
message that names the fault and never the key."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from servekit.api.auth import TokenStore
from servekit.api.keys import read_key_file
from servekit.errors import UnauthorizedError
from tests.helpers import Server, free_port, make_archive, running_server, stop_process, write_config

OK_HANDLER = """
def handle(data, context):
    if data is None:
        return None
    return ["ok"] * len(data)
"""
KEY_VARIABLES = ("SERVEKIT_INFERENCE_KEY", "SERVEKIT_MANAGEMENT_KEY", "SERVEKIT_API_KEY")


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("store")
    make_archive(folder, "m", OK_HANDLER, work=tmp_path_factory.mktemp("work"))
    return folder


@pytest.fixture(autouse=True)
def no_inherited_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in KEY_VARIABLES:
        monkeypatch.delenv(name, raising=False)


def new_keys() -> dict[str, str]:
    return {kind: secrets.token_urlsafe(32) for kind in ("inference", "management", "API")}


def write_keys(path: Path, document: object) -> Path:
    path.write_text(json.dumps(document))
    path.chmod(0o600)
    return path


def key_document(keys: dict[str, str]) -> dict[str, dict[str, str]]:
    return {kind: {"key": key} for kind, key in keys.items()}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def predict(server: Server, key: str | None) -> httpx.Response:
    return server.post("/predictions/m", content=b"x", headers=bearer(key) if key else {})


def list_models(server: Server, key: str | None) -> httpx.Response:
    return httpx.get(server.management + "/models", headers=bearer(key) if key else {}, timeout=30)


def assert_serves_with(server: Server, keys: dict[str, str]) -> None:
    """Each API takes its own key, refuses the other kinds' (403) and no key or a wrong one (401)."""
    response = predict(server, keys["inference"])
    assert (response.status_code, response.text) == (200, "ok")
    assert list_models(server, keys["management"]).status_code == 200
    assert predict(server, keys["management"]).status_code == 403
    assert list_models(server, keys["inference"]).status_code == 403
    assert predict(server, None).status_code == 401
    assert list_models(server, secrets.token_urlsafe(32)).status_code == 401


def assert_no_key_in(text: str, keys: dict[str, str]) -> None:
    for kind, key in keys.items():
        assert key not in text, f"the {kind} key is in the output"


def test_supplied_key_file_is_accepted_alike_by_two_servers(tmp_path: Path, store: Path) -> None:
    keys = new_keys()
    (tmp_path / "secret").mkdir()  # as a mounted Secret: a folder of its own
    key_file = write_keys(tmp_path / "secret" / "key_file.json", key_document(keys))
    before = key_file.read_bytes()
    config = {"key_file": str(key_file), "default_workers_per_model": "1"}
    with contextlib.ExitStack() as stack:
        servers = [
            stack.enter_context(running_server(tmp_path / f"replica{i}", store, config=config, args=()))
            for i in range(2)
        ]
        for server in servers:
            assert_serves_with(server, keys)
            # the keys are the operator's: nothing is published in the working directory
            assert not (server.workdir / "key_file.json").exists()
        # rotation on one replica would leave the others on the old key: refused, whatever key is sent
        for key in (keys["API"], keys["management"], None):
            response = httpx.get(
                servers[0].management + "/token",
                params={"type": "inference"},
                headers=bearer(key) if key else {},
                timeout=30,
            )
            assert response.status_code == 405, response.text
            body = response.json()
            assert body["type"] == "MethodNotAllowedException" and "supplied" in body["message"]
            assert_no_key_in(response.text, keys)
        for server in servers:
            assert_serves_with(server, keys)  # still the same keys everywhere
        for server in servers:
            stop_process(server.process)
            assert server.process.returncode == 0
            log = server.log_text()
            assert "keys supplied by key_file" in log
            assert_no_key_in(log, keys)
            # the snapshot (servers run with snapshots here) holds models, never keys
            snapshot = server.workdir / "logs" / "config" / "snapshot.json"
            assert snapshot.is_file()
            assert_no_key_in(snapshot.read_text(), keys)
    assert key_file.read_bytes() == before  # neither rewritten nor removed at stop


def test_supplied_keys_from_environment_variables(tmp_path: Path, store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    keys = new_keys()
    for kind, name in zip(("inference", "management", "API"), KEY_VARIABLES, strict=True):
        monkeypatch.setenv(name, keys[kind])
    with running_server(tmp_path / "run", store, args=("--ncs",)) as server:
        assert_serves_with(server, keys)
        assert not (server.workdir / "key_file.json").exists()
        response = httpx.get(server.management + "/token", params={"type": "management"}, timeout=30)
        assert response.status_code == 405
    assert "keys supplied by environment variables SERVEKIT_INFERENCE_KEY" in server.log_text()
    assert_no_key_in(server.log_text(), keys)


def test_supplied_key_file_without_api_key_and_with_torchserves_expiration_times(tmp_path: Path) -> None:
    """TorchServe writes Java instants (nanoseconds and Z); the API entry is optional."""
    keys = new_keys()
    later = datetime.now(UTC) + timedelta(hours=1)
    document = {
        "inference": {"key": keys["inference"], "expiration time": later.strftime("%Y-%m-%dT%H:%M:%S.123456789Z")},
        "management": {"key": keys["management"]},
    }
    found = read_key_file(write_keys(tmp_path / "key_file.json", document))
    assert dict(found.keys) == {"inference": keys["inference"], "management": keys["management"]}
    assert abs(found.expiry["inference"] - later.timestamp()) < 1
    assert "management" not in found.expiry
    assert keys["inference"] not in repr(found)


def test_supplied_key_is_refused_after_its_expiration_time(tmp_path: Path) -> None:
    keys = new_keys()
    document = key_document(keys)
    expires = datetime.now(UTC) + timedelta(seconds=1)
    document["inference"]["expiration time"] = expires.isoformat().replace("+00:00", "Z")
    tokens = TokenStore(tmp_path / "unused.json", 60, read_key_file(write_keys(tmp_path / "key_file.json", document)))
    tokens.check("inference", f"Bearer {keys['inference']}")
    time.sleep(max(0.0, expires.timestamp() - time.time() + 0.1))
    with pytest.raises(UnauthorizedError):
        tokens.check("inference", f"Bearer {keys['inference']}")
    tokens.check("management", f"Bearer {keys['management']}")  # no expiration time: never expires
    tokens.remove()
    assert (tmp_path / "key_file.json").is_file() and not (tmp_path / "unused.json").exists()


def start_failure(
    workdir: Path, store: Path, config: dict[str, str], env: dict[str, str] | None = None, args: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    """``servekit start --foreground`` that must stop at once: its result, after checking that it bound nothing."""
    workdir.mkdir(parents=True, exist_ok=True)
    ports = [free_port() for _ in range(3)]
    cfg = write_config(workdir / "config.properties", ports, config)
    command = [sys.executable, "-m", "servekit", "start", "--foreground", "--model-store", str(store)]
    command += ["--ts-config", str(cfg), "--ncs", *args]
    environ = {k: v for k, v in os.environ.items() if k not in KEY_VARIABLES}
    result = subprocess.run(
        command,
        cwd=workdir,
        env={**environ, **(env or {}), "TMPDIR": str(workdir)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert not (workdir / "key_file.json").exists()
    return result


STRONG = secrets.token_urlsafe(32)
OTHER = secrets.token_urlsafe(32)


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (None, "key_file: cannot read"),  # no such file
        ("directory", "key_file: cannot read"),  # not a readable file
        ("{not json", "is not valid JSON"),
        ("", "is not valid JSON"),
        ([STRONG, OTHER], "expected an object"),
        ({"inference": {"key": STRONG}}, "no management entry"),
        ({"inference": {"key": STRONG}, "management": STRONG}, "the management entry must be an object"),
        ({"Inference": {"key": STRONG}, "management": {"key": OTHER}}, "entries other than"),
        ({"inference": {"key": STRONG}, "management": {"key": OTHER, "kee": "x"}}, "must be an object with key"),
        ({"inference": {"key": STRONG}, "management": {"key": 12345}}, "the management key is not a string"),
        ({"inference": {"key": STRONG}, "management": {"key": ""}}, "the management key is empty"),
        ({"inference": {"key": "abcdefgh"}, "management": {"key": OTHER}}, "8 characters long; a key needs at least"),
        ({"inference": {"key": STRONG + " x"}, "management": {"key": OTHER}}, "other than visible ASCII"),
        ({"inference": {"key": STRONG + "\n"}, "management": {"key": OTHER}}, "other than visible ASCII"),
        ({"inference": {"key": STRONG}, "management": {"key": STRONG}}, "inference and management keys are the same"),
        (
            {"inference": {"key": STRONG, "expiration time": "2020-01-01T00:00:00Z"}, "management": {"key": OTHER}},
            "has passed",
        ),
        (
            {"inference": {"key": STRONG, "expiration time": "next week"}, "management": {"key": OTHER}},
            "not an ISO-8601 time",
        ),
    ],
)
def test_bad_key_file_stops_the_start_naming_the_fault_not_the_key(
    tmp_path: Path, store: Path, content: object, words: str
) -> None:
    path = tmp_path / "key_file.json"
    if content == "directory":
        path.mkdir()
    elif isinstance(content, str):
        path.write_text(content)
    elif content is not None:
        write_keys(path, content)
    result = start_failure(tmp_path / "run", store, {"key_file": str(path)})
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stderr.startswith("servekit: ") and words in result.stderr, result.stderr
    assert_no_key_in(result.stdout + result.stderr, {"strong": STRONG, "other": OTHER, "weak": "abcdefgh"})


@pytest.mark.parametrize(
    ("config", "env", "args", "words"),
    [
        ({}, {"SERVEKIT_INFERENCE_KEY": STRONG}, (), "set but not SERVEKIT_MANAGEMENT_KEY"),
        ({}, {"SERVEKIT_INFERENCE_KEY": STRONG, "SERVEKIT_MANAGEMENT_KEY": ""}, (), "SERVEKIT_MANAGEMENT_KEY is empty"),
        ({}, {"SERVEKIT_INFERENCE_KEY": "short", "SERVEKIT_MANAGEMENT_KEY": OTHER}, (), "SERVEKIT_INFERENCE_KEY is 5"),
        (
            {"key_file": "keys.json"},
            {"SERVEKIT_INFERENCE_KEY": STRONG, "SERVEKIT_MANAGEMENT_KEY": OTHER},
            (),
            "both supply keys",
        ),
        (
            {},
            {"SERVEKIT_INFERENCE_KEY": STRONG, "SERVEKIT_MANAGEMENT_KEY": OTHER},
            ("--disable-token-auth",),
            "contradict each other",
        ),
        ({"key_file": " "}, {}, (), "key_file: empty"),  # e.g. key_file=$$KEYS$$ with KEYS empty
    ],
)
def test_bad_supplied_keys_stop_the_start(
    tmp_path: Path, store: Path, config: dict[str, str], env: dict[str, str], args: tuple[str, ...], words: str
) -> None:
    result = start_failure(tmp_path / "run", store, config, env, args)
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stderr.startswith("servekit: ") and words in result.stderr, result.stderr
    assert_no_key_in(result.stdout + result.stderr, {"strong": STRONG, "other": OTHER})


def test_background_start_with_a_bad_key_file_fails_before_starting_a_server(tmp_path: Path, store: Path) -> None:
    cfg = write_config(tmp_path / "config.properties", [free_port() for _ in range(3)], {"key_file": "missing.json"})
    command = [sys.executable, "-m", "servekit", "start", "--model-store", str(store), "--ts-config", str(cfg)]
    env = {k: v for k, v in os.environ.items() if k not in KEY_VARIABLES}
    result = subprocess.run(
        command, cwd=tmp_path, env={**env, "TMPDIR": str(tmp_path)}, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 1
    assert "servekit: key_file: cannot read" in result.stderr
    assert not (tmp_path / "logs" / "servekit.log").exists()  # no background server was started
