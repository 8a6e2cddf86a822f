"""Snapshots: every successful management change is written to ``<log_location>/config/snapshot.json`` (atomically,
the one before kept as ``.prev``) and restored when a server starts in the same folder; ``--ncs`` turns both off; a
corrupt snapshot or a missing archive is a logged error, never a crash loop."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from servekit import snapshot
from tests.helpers import Server, make_archive, running_server, stop_process

SNAPSHOT_ON = ("--enable-model-api", "--disable-token-auth")
NO_WORKERS = {"default_workers_per_model": "0"}  # worker processes import torch: the slow part of a start
ENTRY_KEYS = {"defaultVersion", "marName", *snapshot.FIELDS}
BROKEN_HANDLER = """
def handle(data, context):
    raise RuntimeError("cannot load this model")
"""


def replying(text: str) -> str:
    """A handler-only model (loads fast) that answers ``text`` to every request."""
    return f"""
def handle(data, context):
    if data is None:
        return None
    return [{text!r}] * len(data)
"""


def archive(store: Path, work: Path, name: str, version: str = "1.0", handler: str | None = None) -> str:
    """Archive ``name`` ``version`` into ``store`` as ``<name>-<version>.mar`` (so that versions can sit side by
    side); its handler answers ``<name>-<version>``. Returns the file name."""
    out = work / f"out-{name}-{version}"
    out.mkdir(parents=True)
    built = make_archive(out, name, handler or replying(f"{name}-{version}"), work=work, version=version)
    target = store / f"{name}-{version}.mar"
    built.rename(target)
    return target.name


@pytest.fixture
def store(tmp_path: Path) -> Path:
    """A model store with a 1.0, b 1.0, b 2.0 and decoy 1.0."""
    folder = tmp_path / "store"
    folder.mkdir()
    for name, version in (("a", "1.0"), ("b", "1.0"), ("b", "2.0"), ("decoy", "1.0")):
        archive(folder, tmp_path / "work", name, version)
    return folder


def snapshot_path(workdir: Path) -> Path:
    return workdir / "logs" / "config" / snapshot.FILE_NAME


def prev_path(workdir: Path) -> Path:
    return workdir / "logs" / "config" / (snapshot.FILE_NAME + ".prev")


def entry(mar: str, workers: int = 1) -> dict[str, Any]:
    return {"defaultVersion": True, "marName": mar, "minWorkers": workers, "maxWorkers": workers}


def write_snapshot(workdir: Path, models: dict[str, dict[str, dict[str, Any]]]) -> None:
    folder = workdir / "logs" / "config"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / snapshot.FILE_NAME).write_text(json.dumps({"created": 1, "models": models}))


def read_document(path: Path) -> dict[str, Any]:
    """The snapshot file, checked against the documented shape."""
    document = json.loads(path.read_text())
    assert isinstance(document, dict) and set(document) == {"created", "models"}
    assert isinstance(document["created"], int) and document["created"] > 0
    for versions in document["models"].values():
        for item in versions.values():
            assert set(item) == ENTRY_KEYS
            assert isinstance(item["defaultVersion"], bool) and isinstance(item["marName"], str)
            assert all(isinstance(item[key], int | float) for key in snapshot.FIELDS)
    return document


def mgmt(server: Server, method: str, path: str, **params: str) -> httpx.Response:
    return httpx.request(method, server.management + path, params=params, timeout=60)


def model_names(server: Server) -> list[str]:
    return [m["modelName"] for m in mgmt(server, "GET", "/models").json()["models"]]


def state(server: Server, name: str) -> list[dict[str, Any]]:
    """What a restart must keep of each version of ``name``, sorted by version."""
    keep = ("modelName", "modelVersion", "minWorkers", "maxWorkers", "batchSize", "maxBatchDelay", "responseTimeout")
    versions = mgmt(server, "GET", f"/models/{name}/all").json()
    found = [{**{k: m[k] for k in keep}, "workers": len(m["workers"])} for m in versions]
    return sorted(found, key=lambda m: m["modelVersion"])


def assert_alive(server: Server) -> None:
    time.sleep(0.5)  # a crash loop would show here
    assert server.process.poll() is None
    assert httpx.get(server.inference + "/ping", timeout=5).json() == {"status": "Healthy"}


MODELS = {"m": {"1.0": {"defaultVersion": True, "marName": "m.mar", "minWorkers": 2, "batchSize": 4}}}


# --- servekit.snapshot on its own ---------------------------------------------------------------------------------


def test_snapshot_write_then_read_round_trips(tmp_path: Path) -> None:
    before = int(time.time() * 1000)
    path = snapshot.write(tmp_path / "config", MODELS)
    assert path == tmp_path / "config" / "snapshot.json"
    assert snapshot.read(tmp_path / "config") == MODELS
    document = json.loads(path.read_text())
    assert document["models"] == MODELS and before <= document["created"] <= time.time() * 1000
    assert [p.name for p in path.parent.iterdir()] == ["snapshot.json"]  # no temp file left behind


def test_snapshot_write_keeps_the_previous_snapshot_as_prev(tmp_path: Path) -> None:
    snapshot.write(tmp_path, MODELS)
    first = (tmp_path / "snapshot.json").read_bytes()
    snapshot.write(tmp_path, {})
    assert (tmp_path / "snapshot.json.prev").read_bytes() == first
    assert snapshot.read(tmp_path) == {}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["snapshot.json", "snapshot.json.prev"]


def test_snapshot_write_never_leaves_the_folder_without_a_whole_snapshot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A reader (or a crash) may come between any two steps of write(): snapshot.json must always be there and parse,
    # as with a plain rename over the old file.
    snapshot.write(tmp_path, MODELS)
    real_replace = os.replace
    seen = []

    def replace_and_look(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        real_replace(src, dst)
        path = tmp_path / "snapshot.json"
        seen.append(json.loads(path.read_text())["models"] if path.exists() else None)

    monkeypatch.setattr(os, "replace", replace_and_look)
    snapshot.write(tmp_path, {})
    assert None not in seen, f"snapshot.json was missing after a step of write(): {seen}"
    assert seen[-1] == {}


def test_snapshot_read_of_a_folder_without_snapshot_is_none(tmp_path: Path) -> None:
    assert snapshot.read(tmp_path) is None
    assert snapshot.read(tmp_path / "missing") is None


def test_snapshot_read_falls_back_to_prev_when_the_latest_is_corrupt(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    snapshot.write(tmp_path, MODELS)
    snapshot.write(tmp_path, {})
    (tmp_path / "snapshot.json").write_bytes(b"\x00garbage{")
    with caplog.at_level(logging.ERROR, logger="servekit.snapshot"):
        assert snapshot.read(tmp_path) == MODELS
    assert "snapshot.json" in caplog.text and "unreadable" in caplog.text


def test_snapshot_read_is_none_when_latest_and_prev_are_corrupt(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "snapshot.json").write_text("not json")
    (tmp_path / "snapshot.json.prev").write_text('{"models": 3}')
    with caplog.at_level(logging.ERROR, logger="servekit.snapshot"):
        assert snapshot.read(tmp_path) is None
    assert [r.levelno for r in caplog.records] == [logging.ERROR, logging.ERROR]
    assert "snapshot.json.prev" in caplog.records[1].getMessage()


@pytest.mark.parametrize(
    "text",
    [
        "",
        "{",
        "[]",
        "null",
        "7",
        '"models"',
        "{}",
        '{"models": []}',
        '{"models": {"m": []}}',
        '{"models": {"m": {"1.0": "m.mar"}}}',
        '{"models": {"m": {"1.0": {}}}}',
        '{"models": {"m": {"1.0": {"marName": 7}}}}',
        '{"models": {"m": {"1.0": {"marName": "m.mar", "batchSize": "4"}}}}',
        '{"models": {"m": {"1.0": {"marName": "m.mar", "minWorkers": null}}}}',
        pytest.param("[" * 100_000, id="deeply-nested"),
    ],
    ids=lambda text: text or "empty",
)
def test_snapshot_read_rejects_invalid_snapshots(tmp_path: Path, caplog: pytest.LogCaptureFixture, text: str) -> None:
    (tmp_path / "snapshot.json").write_text(text)
    with caplog.at_level(logging.ERROR, logger="servekit.snapshot"):
        assert snapshot.read(tmp_path) is None
    assert "unreadable" in caplog.text


def test_snapshot_read_rejects_undecodable_bytes(tmp_path: Path) -> None:
    (tmp_path / "snapshot.json").write_bytes(os.urandom(64) + b"\xff\xfe")
    assert snapshot.read(tmp_path) is None


# --- real servers -------------------------------------------------------------------------------------------------


def test_snapshot_restart_restores_models_versions_defaults_workers_and_batching(tmp_path: Path, store: Path) -> None:
    workdir = tmp_path / "run"
    with running_server(workdir, store, ("b=b-1.0.mar",), args=SNAPSHOT_ON) as server:
        params = {"url": "a-1.0.mar", "initial_workers": "2", "batch_size": "4", "max_batch_delay": "50"}
        assert mgmt(server, "POST", "/models", **params).status_code == 200
        assert mgmt(server, "POST", "/models", url="b-2.0.mar", initial_workers="1").status_code == 200
        assert mgmt(server, "PUT", "/models/b/2.0/set-default").status_code == 200
        response = mgmt(server, "PUT", "/models/b/1.0", min_worker="0", max_worker="2", synchronous="true")
        assert response.status_code == 200
        before = {name: state(server, name) for name in ("a", "b")}
        stop_process(server.process)
        assert server.process.returncode == 0
    assert before["a"] == [
        {
            "modelName": "a",
            "modelVersion": "1.0",
            "minWorkers": 2,
            "maxWorkers": 2,
            "batchSize": 4,
            "maxBatchDelay": 50,
            "responseTimeout": 120,
            "workers": 2,
        }
    ]
    assert [(m["minWorkers"], m["maxWorkers"], m["workers"]) for m in before["b"]] == [(0, 2, 0), (1, 1, 1)]

    # The decoy in --models is ignored: the snapshot says what to load.
    with running_server(workdir, store, ("decoy=decoy-1.0.mar",), args=SNAPSHOT_ON) as server:
        assert sorted(model_names(server)) == ["a", "b"]
        assert {name: state(server, name) for name in ("a", "b")} == before
        assert mgmt(server, "GET", "/models/b").json()[0]["modelVersion"] == "2.0"
        assert mgmt(server, "GET", "/models/decoy").status_code == 404
        assert server.post("/predictions/a", content=b"x").text == "a-1.0"
        assert server.post("/predictions/b", content=b"x").text == "b-2.0"


def test_snapshot_restores_a_model_registered_by_file_url(tmp_path: Path, store: Path) -> None:
    workdir = tmp_path / "run"
    with running_server(workdir, store, ("a=a-1.0.mar",), NO_WORKERS, SNAPSHOT_ON) as server:
        url = (store / "b-1.0.mar").as_uri()
        assert mgmt(server, "POST", "/models", url=url, initial_workers="0").status_code == 200
    with running_server(workdir, store, ("a=a-1.0.mar",), NO_WORKERS, SNAPSHOT_ON) as server:
        assert sorted(model_names(server)) == ["a", "b"], server.log_text()


def test_snapshot_is_replaced_after_every_successful_change_and_kept_on_failure(tmp_path: Path, store: Path) -> None:
    archive(store, tmp_path / "work", "broken", handler=BROKEN_HANDLER)
    workdir = tmp_path / "run"
    path, prev = snapshot_path(workdir), prev_path(workdir)
    with running_server(workdir, store, ("a=a-1.0.mar",), NO_WORKERS, SNAPSHOT_ON) as server:
        assert read_document(path)["models"] == {
            "a": {
                "1.0": {
                    "defaultVersion": True,
                    "marName": "a-1.0.mar",
                    "minWorkers": 0,
                    "maxWorkers": 0,
                    "batchSize": 1,
                    "maxBatchDelay": 100,
                    "responseTimeout": 120,
                    "startupTimeout": 120,
                    "jobQueueSize": 100,
                }
            }
        }
        changes = [
            ("POST", "/models", {"url": "b-1.0.mar", "initial_workers": "0"}),
            ("POST", "/models", {"url": "b-2.0.mar", "initial_workers": "0", "batch_size": "3"}),
            ("PUT", "/models/b/2.0/set-default", {}),
            ("PUT", "/models/a", {"min_worker": "0", "max_worker": "2", "synchronous": "true"}),
            ("DELETE", "/models/b/1.0", {}),
        ]
        seen = []
        for method, url, params in changes:
            old = path.read_bytes()
            assert mgmt(server, method, url, **params).status_code == 200, (method, url)
            assert path.read_bytes() != old and prev.read_bytes() == old, (method, url)
            seen.append(read_document(path)["models"])
        assert list(seen[0]["b"]) == ["1.0"]
        assert seen[1]["b"]["2.0"]["batchSize"] == 3 and not seen[1]["b"]["2.0"]["defaultVersion"]
        assert seen[2]["b"]["2.0"]["defaultVersion"] and not seen[2]["b"]["1.0"]["defaultVersion"]
        assert (seen[3]["a"]["1.0"]["minWorkers"], seen[3]["a"]["1.0"]["maxWorkers"]) == (0, 2)
        assert list(seen[4]["b"]) == ["2.0"]

        failures = [
            ("POST", "/models", {"url": "missing.mar"}, 404),
            ("POST", "/models", {"url": "b-2.0.mar"}, 409),  # already registered
            ("PUT", "/models/b/9.9/set-default", {}, 404),
        ]
        last, last_prev = path.read_bytes(), prev.read_bytes()
        for method, url, params, status in failures:
            assert mgmt(server, method, url, **params).status_code == status, (url, params)
            assert path.read_bytes() == last and prev.read_bytes() == last_prev, (url, params)
        # a registration whose workers fail to start leaves the model registered with none, as TorchServe does
        assert mgmt(server, "POST", "/models", url="broken-1.0.mar", initial_workers="1").status_code == 500
        saved = read_document(path)["models"]["broken"]["1.0"]
        assert (saved["minWorkers"], saved["maxWorkers"]) == (0, 0)
        assert sorted(p.name for p in path.parent.iterdir()) == ["snapshot.json", "snapshot.json.prev"]


def test_snapshot_ncs_neither_writes_nor_reads(tmp_path: Path, store: Path) -> None:
    workdir = tmp_path / "run"
    write_snapshot(workdir, {"b": {"1.0": entry("b-1.0.mar")}})
    saved = snapshot_path(workdir).read_bytes()
    with running_server(workdir, store, ("a=a-1.0.mar",), NO_WORKERS, ("--ncs", *SNAPSHOT_ON)) as server:
        assert model_names(server) == ["a"]
        assert mgmt(server, "POST", "/models", url="decoy-1.0.mar", initial_workers="0").status_code == 200
        assert mgmt(server, "PUT", "/models/a", min_worker="0", synchronous="true").status_code == 200
    assert snapshot_path(workdir).read_bytes() == saved
    assert [p.name for p in snapshot_path(workdir).parent.iterdir()] == ["snapshot.json"]


def test_snapshot_corrupt_latest_falls_back_to_prev(tmp_path: Path, store: Path) -> None:
    workdir = tmp_path / "run"
    write_snapshot(workdir, {"b": {"1.0": entry("b-1.0.mar")}})
    snapshot_path(workdir).rename(prev_path(workdir))
    snapshot_path(workdir).write_bytes(b'{"created": 12, "models": {"a": \x00\x01 garbage')
    with running_server(workdir, store, ("a=a-1.0.mar",), args=SNAPSHOT_ON) as server:
        assert_alive(server)
        assert model_names(server) == ["b"]
        assert server.post("/predictions/b", content=b"x").text == "b-1.0"
        errors = [line for line in server.log_text().splitlines() if " ERROR " in line]
        assert any("snapshot.json" in line and "unreadable" in line for line in errors), server.log_text()
    assert list(read_document(snapshot_path(workdir))["models"]) == ["b"]  # rewritten whole


def test_snapshot_corrupt_latest_and_prev_start_from_models(tmp_path: Path, store: Path) -> None:
    workdir = tmp_path / "run"
    write_snapshot(workdir, {})
    snapshot_path(workdir).write_text("garbage")
    prev_path(workdir).write_text('{"models": {"b": {"1.0": {"minWorkers": 1}}}}')  # parses, but no marName
    with running_server(workdir, store, ("a=a-1.0.mar",), NO_WORKERS, SNAPSHOT_ON) as server:
        assert_alive(server)
        assert model_names(server) == ["a"]
        errors = [line for line in server.log_text().splitlines() if " ERROR " in line]
        assert any("snapshot.json " in line for line in errors) and any("snapshot.json.prev" in line for line in errors)
    assert list(read_document(snapshot_path(workdir))["models"]) == ["a"]


def test_snapshot_naming_a_missing_archive_logs_it_and_serves_the_others(tmp_path: Path, store: Path) -> None:
    workdir = tmp_path / "run"
    write_snapshot(workdir, {"a": {"1.0": entry("a-1.0.mar")}, "gone": {"1.0": entry("gone-1.0.mar")}})
    with running_server(workdir, store, ("decoy=decoy-1.0.mar",), args=SNAPSHOT_ON) as server:
        assert_alive(server)
        assert model_names(server) == ["a"]
        assert server.post("/predictions/a", content=b"x").text == "a-1.0"
        errors = [line for line in server.log_text().splitlines() if " ERROR " in line]
        assert any("gone-1.0.mar" in line for line in errors), server.log_text()


def test_snapshot_with_out_of_range_numbers_logs_it_and_serves_the_others(tmp_path: Path, store: Path) -> None:
    workdir = tmp_path / "run"
    bad = {**entry("b-1.0.mar", workers=0), "batchSize": 1e400}  # json writes Infinity, a number to _parse
    write_snapshot(workdir, {"a": {"1.0": entry("a-1.0.mar", workers=0)}, "b": {"1.0": bad}})
    with running_server(workdir, store, ("decoy=decoy-1.0.mar",), NO_WORKERS, SNAPSHOT_ON) as server:
        assert_alive(server)
        assert model_names(server) == ["a"]
        assert any(" ERROR " in line and "b-1.0.mar" in line for line in server.log_text().splitlines())
