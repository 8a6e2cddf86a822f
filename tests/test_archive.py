"""servekit.archive.open_archive: real archives from ``servekit archive`` load; unsafe or broken ones are refused
with ArchiveError, leave nothing behind, and write nothing outside their staging folder."""

from __future__ import annotations

import io
import json
import random
import stat
import struct
import tarfile
import zipfile
from pathlib import Path

import pytest

import servekit.archive
from servekit.archive import MAX_RATIO, open_archive
from servekit.errors import ArchiveError
from tests.helpers import make_archive, write

HANDLER_PY = """
def handle(data, context):
    return [None] * len(data or [])
"""
MODEL_CONFIG = "batchSize: 4\nmaxBatchDelay: 50\nhandler:\n  topk: 2\n"
MANIFEST = {"runtime": "python", "model": {"modelName": "tiny", "modelVersion": "2.0", "handler": "handler.py"}}


@pytest.fixture(scope="module")
def archives(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One real eager-model archive with a model-config YAML per format, built by ``servekit archive``."""
    work = tmp_path_factory.mktemp("work")
    built = {}
    for fmt in ("default", "tgz", "no-archive"):
        store = tmp_path_factory.mktemp(f"store-{fmt}")
        built[fmt] = make_archive(
            store, "mlp", HANDLER_PY, work=work, model="eager", config=MODEL_CONFIG, fmt=fmt, version="3.1"
        )
    return built


@pytest.fixture
def staging(tmp_path: Path) -> Path:
    root = tmp_path / "staging"
    root.mkdir()
    return root


def zip_archive(path: Path, entries: dict[str, bytes], manifest: object = MANIFEST) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        if manifest is not None:
            data = manifest if isinstance(manifest, bytes) else json.dumps(manifest).encode()
            archive.writestr("MAR-INF/MANIFEST.json", data)
        for name, data in entries.items():
            archive.writestr(name, data)
    return path


def tar_archive(path: Path, members: list[tuple[tarfile.TarInfo, bytes]]) -> Path:
    manifest = json.dumps(MANIFEST).encode()
    info = tarfile.TarInfo("tiny/MAR-INF/MANIFEST.json")
    info.size = len(manifest)
    with tarfile.open(path, "w:gz") as archive:
        archive.addfile(info, io.BytesIO(manifest))
        for member, data in members:
            member.size = len(data) if member.isfile() else 0
            archive.addfile(member, io.BytesIO(data) if member.isfile() else None)
    return path


def tar_member(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    member = tarfile.TarInfo(name)
    member.type = kind
    member.linkname = linkname
    return member


def assert_refused(path: Path, staging: Path, match: str) -> None:
    with pytest.raises(ArchiveError, match=match):
        open_archive(path, staging_root=staging)
    assert list(staging.iterdir()) == []


@pytest.mark.parametrize("fmt", ["default", "tgz"])
def test_open_archive_extracts_file_archive_into_private_staging(
    archives: dict[str, Path], staging: Path, fmt: str
) -> None:
    spec = open_archive(archives[fmt], staging_root=staging)
    assert (spec.name, spec.version, spec.handler, spec.runtime) == ("mlp", "3.1", "mlp_handler.py", "python")
    assert spec.config == {"batchSize": 4, "maxBatchDelay": 50, "handler": {"topk": 2}}
    assert spec.manifest["model"]["modelName"] == "mlp"
    assert spec.staging is not None and spec.staging.parent == staging
    assert stat.S_IMODE(spec.staging.stat().st_mode) == 0o700
    assert spec.model_dir.is_relative_to(spec.staging)
    # the tgz content lies under one top-level folder "mlp/", which open_archive descends into
    assert {"mlp_handler.py", "model.py", "weights.pt", "MAR-INF"} <= {p.name for p in spec.model_dir.iterdir()}


def test_open_archive_reads_unpacked_folder_in_place(archives: dict[str, Path], staging: Path) -> None:
    folder = archives["no-archive"]
    spec = open_archive(folder, staging_root=staging)
    assert (spec.name, spec.version, spec.handler) == ("mlp", "3.1", "mlp_handler.py")
    assert spec.config["batchSize"] == 4
    assert spec.model_dir == folder.resolve()
    assert spec.staging is None
    assert list(staging.iterdir()) == []


@pytest.mark.parametrize("fmt", ["default", "tgz", "no-archive"])
def test_open_archive_name_argument_overrides_manifest(archives: dict[str, Path], staging: Path, fmt: str) -> None:
    spec = open_archive(archives[fmt], name="renamed", staging_root=staging)
    assert (spec.name, spec.version) == ("renamed", "3.1")
    spec.remove_staging()


def test_open_archive_folder_without_manifest_gets_default_name_and_version(tmp_path: Path) -> None:
    folder = tmp_path / "my-model.v2"
    write(folder / "handler.py", HANDLER_PY)
    spec = open_archive(folder)
    assert (spec.name, spec.version, spec.handler, spec.runtime) == ("my_model_v2", "1.0", "", "python")
    assert spec.config == {}


def test_open_archive_zip_without_manifest_derives_name_from_file(tmp_path: Path, staging: Path) -> None:
    path = zip_archive(tmp_path / "resnet-18.mar", {"handler.py": b"x"}, manifest=None)
    spec = open_archive(path, staging_root=staging)
    assert (spec.name, spec.version) == ("resnet_18", "1.0")
    spec.remove_staging()


def test_open_archive_extracts_several_large_entries_side_by_side_intact(tmp_path: Path, staging: Path) -> None:
    size = servekit.archive.PARALLEL_BYTES
    entries = {f"weights/part{i}.bin": random.Random(i).randbytes(size) for i in range(3)}
    path = tmp_path / "m.mar"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:  # stored: random bytes do not deflate
        archive.writestr("MAR-INF/MANIFEST.json", json.dumps(MANIFEST))
        for name, data in {**entries, "handler.py": b"x"}.items():
            archive.writestr(name, data)
    spec = open_archive(path, staging_root=staging)
    for name, data in entries.items():
        assert (spec.model_dir / name).read_bytes() == data
    assert (spec.model_dir / "handler.py").read_bytes() == b"x"
    spec.remove_staging()


def test_model_spec_remove_staging_removes_extracted_archive(archives: dict[str, Path], staging: Path) -> None:
    spec = open_archive(archives["default"], staging_root=staging)
    assert spec.staging is not None and spec.staging.is_dir()
    spec.remove_staging()
    assert not spec.staging.exists()
    assert list(staging.iterdir()) == []


def test_model_spec_remove_staging_never_touches_folder_model(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    write(folder / "handler.py", HANDLER_PY)
    write(folder / "MAR-INF" / "MANIFEST.json", json.dumps(MANIFEST))
    spec = open_archive(folder)
    assert spec.staging is None
    spec.remove_staging()
    assert (folder / "handler.py").read_text() == HANDLER_PY
    assert (folder / "MAR-INF" / "MANIFEST.json").is_file()


@pytest.mark.parametrize("entry", ["../evil.txt", "../../../evil.txt", "model/../../../../evil.txt", "..\\evil.txt"])
def test_open_archive_refuses_zip_entry_with_dotdot(tmp_path: Path, staging: Path, entry: str) -> None:
    path = zip_archive(tmp_path / "evil.mar", {"handler.py": b"ok", entry: b"pwned"})
    assert_refused(path, staging, "unsafe entry")
    assert not (tmp_path / "evil.txt").exists()


def test_open_archive_refuses_zip_entry_with_absolute_path(tmp_path: Path, staging: Path) -> None:
    evil = tmp_path / "outside" / "evil.txt"
    evil.parent.mkdir()
    path = zip_archive(tmp_path / "evil.mar", {"handler.py": b"ok", str(evil): b"pwned"})
    assert_refused(path, staging, "unsafe entry")
    assert not evil.exists()


def test_open_archive_refuses_zip_symlink_entry(tmp_path: Path, staging: Path) -> None:
    path = tmp_path / "link.mar"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("MAR-INF/MANIFEST.json", json.dumps(MANIFEST))
        link = zipfile.ZipInfo("handler.py")
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        archive.writestr(link, str(tmp_path / "secret"))
    assert_refused(path, staging, "'handler.py' is a link or special file")


@pytest.mark.parametrize(
    ("member", "match"),
    [
        (tar_member("tiny/handler.py", tarfile.SYMTYPE, "/etc/passwd"), "is a link or special file"),
        (tar_member("tiny/handler.py", tarfile.LNKTYPE, "tiny/MAR-INF/MANIFEST.json"), "is a link or special file"),
        (tar_member("tiny/pipe", tarfile.FIFOTYPE), "is a link or special file"),
        (tar_member("tiny/null", tarfile.CHRTYPE), "is a link or special file"),
        (tar_member("tiny/disk", tarfile.BLKTYPE), "is a link or special file"),
        (tar_member("tiny/../../../evil.txt"), "unsafe entry"),
        (tar_member("../evil.txt"), "unsafe entry"),
    ],
    ids=["symlink", "hardlink", "fifo", "chardev", "blockdev", "dotdot-nested", "dotdot"],
)
def test_open_archive_refuses_unsafe_tar_entry(
    tmp_path: Path, staging: Path, member: tarfile.TarInfo, match: str
) -> None:
    path = tar_archive(tmp_path / "evil.tar.gz", [(member, b"pwned")])
    assert_refused(path, staging, match)
    assert not (tmp_path / "evil.txt").exists()


def test_open_archive_refuses_tar_entry_with_absolute_path(tmp_path: Path, staging: Path) -> None:
    evil = tmp_path / "outside" / "evil.txt"
    evil.parent.mkdir()
    path = tar_archive(tmp_path / "evil.tgz", [(tar_member(str(evil)), b"pwned")])
    assert_refused(path, staging, "unsafe entry")
    assert not evil.exists()


def test_open_archive_refuses_truncated_mar(archives: dict[str, Path], tmp_path: Path, staging: Path) -> None:
    data = archives["default"].read_bytes()
    path = tmp_path / "half.mar"
    path.write_bytes(data[: len(data) // 2])
    assert_refused(path, staging, "half.mar: not a zip")


def test_open_archive_refuses_truncated_tgz(archives: dict[str, Path], tmp_path: Path, staging: Path) -> None:
    data = archives["tgz"].read_bytes()
    path = tmp_path / "half.tar.gz"
    path.write_bytes(data[: len(data) // 2])
    assert_refused(path, staging, "half.tar.gz: corrupt archive")


def test_open_archive_refuses_zip_with_bad_crc(tmp_path: Path, staging: Path) -> None:
    path = tmp_path / "crc.mar"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("MAR-INF/MANIFEST.json", json.dumps(MANIFEST))
        archive.writestr("weights.bin", b"A" * 4096)
    data = path.read_bytes()
    path.write_bytes(data.replace(b"A" * 64, b"B" * 64, 1))
    assert_refused(path, staging, "crc.mar: corrupt archive")


@pytest.mark.parametrize("suffix", [".mar", ".tar.gz"])
def test_open_archive_refuses_corrupt_deflate_stream(tmp_path: Path, staging: Path, suffix: str) -> None:
    text = " ".join(str(i) for i in range(50_000)).encode()
    path = tmp_path / f"bad{suffix}"
    if suffix == ".mar":
        zip_archive(path, {"data.txt": text})
    else:
        tar_archive(path, [(tar_member("tiny/data.txt"), text)])
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 50] = b"\xff" * 50
    path.write_bytes(bytes(data))
    assert_refused(path, staging, "corrupt archive")


def test_open_archive_refuses_zip_with_unknown_compression_method(tmp_path: Path, staging: Path) -> None:
    path = zip_archive(tmp_path / "method.mar", {"handler.py": b"x" * 100})
    data = bytearray(path.read_bytes())
    for signature, offset in ((b"PK\x03\x04", 8), (b"PK\x01\x02", 10)):  # local and central headers
        start = data.find(signature)
        while start >= 0:
            data[start + offset : start + offset + 2] = struct.pack("<H", 99)
            start = data.find(signature, start + 4)
    path.write_bytes(bytes(data))
    assert_refused(path, staging, "method.mar: corrupt archive")


def test_open_archive_refuses_file_that_is_not_an_archive(tmp_path: Path, staging: Path) -> None:
    path = tmp_path / "model.mar"
    path.write_text("this is a plain text file, not an archive\n" * 20)
    assert_refused(path, staging, "model.mar: not a zip")


def test_open_archive_refuses_missing_path(tmp_path: Path, staging: Path) -> None:
    assert_refused(tmp_path / "absent.mar", staging, "Model not found at: .*absent.mar")


@pytest.mark.parametrize(
    ("manifest", "entries", "match"),
    [
        (b"{not json", {}, "MANIFEST.json is not valid JSON"),
        (b"\xff\xfe\x00garbage", {}, "MANIFEST.json is not valid JSON"),
        ({"runtime": "python"}, {}, "has no 'model' section"),
        ({"model": "tiny"}, {}, "has no 'model' section"),
        ([1, 2], {}, "has no 'model' section"),
        ({"runtime": "LSP", "model": {"modelName": "tiny"}}, {}, "runtime 'LSP' is not supported"),
        (
            {"model": {"modelName": "tiny", "configFile": "model-config.yaml"}},
            {"model-config.yaml": b"- a\n- b\n"},
            "model-config.yaml must be a mapping",
        ),
        (
            {"model": {"modelName": "tiny", "configFile": "model-config.yaml"}},
            {"model-config.yaml": b"key: [unclosed\n"},
            "cannot read model config model-config.yaml",
        ),
        (
            {"model": {"modelName": "tiny", "configFile": "missing.yaml"}},
            {},
            "cannot read model config missing.yaml",
        ),
    ],
    ids=["bad-json", "not-utf8", "no-model", "model-not-dict", "not-object", "lsp", "yaml-list", "bad-yaml", "no-yaml"],
)
def test_open_archive_refuses_bad_manifest_or_model_config(
    tmp_path: Path, staging: Path, manifest: object, entries: dict[str, bytes], match: str
) -> None:
    path = zip_archive(tmp_path / "bad.mar", {"handler.py": b"x", **entries}, manifest=manifest)
    assert_refused(path, staging, match)


def test_open_archive_refuses_bad_manifest_in_folder(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    write(folder / "MAR-INF" / "MANIFEST.json", '{"runtime": "LSP", "model": {}}')
    write(folder / "handler.py", HANDLER_PY)
    with pytest.raises(ArchiveError, match="runtime 'LSP' is not supported"):
        open_archive(folder)
    assert (folder / "handler.py").is_file()


def test_open_archive_refuses_zip_bomb(tmp_path: Path, staging: Path) -> None:
    path = zip_archive(tmp_path / "bomb.mar", {"weights.pt": bytes(50 * 2**20)})
    info = zipfile.ZipFile(path).getinfo("weights.pt")
    assert info.file_size > MAX_RATIO * info.compress_size
    assert_refused(path, staging, "'weights.pt' has a suspicious compression ratio")


def test_open_archive_accepts_small_highly_compressible_entry(tmp_path: Path, staging: Path) -> None:
    path = zip_archive(tmp_path / "zeros.mar", {"zeros.bin": bytes(2**20)})
    spec = open_archive(path, staging_root=staging)
    assert (spec.model_dir / "zeros.bin").stat().st_size == 2**20
    spec.remove_staging()


def test_open_archive_refuses_too_many_zip_entries(
    tmp_path: Path, staging: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(servekit.archive, "MAX_ENTRIES", 3)
    ok = zip_archive(tmp_path / "ok.mar", {"a.py": b"a", "b.py": b"b"})
    open_archive(ok, staging_root=staging).remove_staging()
    path = zip_archive(tmp_path / "many.mar", {f"f{i}.py": b"x" for i in range(5)})
    assert_refused(path, staging, "many.mar: 6 entries, more than the limit of 3")


def test_open_archive_refuses_too_many_tar_entries(
    tmp_path: Path, staging: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(servekit.archive, "MAX_ENTRIES", 3)
    path = tar_archive(tmp_path / "many.tgz", [(tar_member(f"tiny/f{i}.py"), b"x") for i in range(5)])
    assert_refused(path, staging, "many.tgz: 6 entries, more than the limit of 3")


def test_open_archive_refuses_tar_over_total_size(
    tmp_path: Path, staging: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(servekit.archive, "MAX_TOTAL_BYTES", 1000)
    path = tar_archive(tmp_path / "big.tgz", [(tar_member("tiny/zeros.bin"), bytes(2000))])
    assert_refused(path, staging, "big.tgz: .* bytes uncompressed, more than the limit of 1000")


def test_open_archive_refuses_config_file_outside_the_model(tmp_path: Path, staging: Path) -> None:
    secret = tmp_path / "secret.yaml"
    secret.write_text("password: hunter2\n")
    manifest = {"runtime": "python", "model": {"modelName": "m", "handler": "h.py", "configFile": str(secret)}}
    path = zip_archive(tmp_path / "m.mar", {"h.py": b""}, manifest=manifest)
    with pytest.raises(ArchiveError, match="outside the model folder"):
        open_archive(path, staging_root=staging)
    assert list(staging.iterdir()) == []


def test_open_archive_refuses_gzip_bomb(tmp_path: Path, staging: Path) -> None:
    path = tmp_path / "bomb.tar.gz"
    with tarfile.open(path, "w:gz") as tf:
        info = tarfile.TarInfo("zeros.bin")
        info.size = 50 * 2**20
        tf.addfile(info, io.BytesIO(bytes(info.size)))
    with pytest.raises(ArchiveError, match="compression ratio"):
        open_archive(path, staging_root=staging)
    assert list(staging.iterdir()) == []
