"""servekit.archiver against the real torch-model-archiver 0.12, on real torch models built in tmp dirs."""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import re
import shutil
import subprocess
import sys
import tarfile
import warnings
import zipfile
from pathlib import Path

import pytest

from servekit.archiver import add_arguments, main, run
from servekit.errors import ArchiveError

FORMATS = ["default", "zip-store", "tgz", "no-archive"]
SUFFIXES = {"default": ".mar", "zip-store": ".mar", "tgz": ".tar.gz", "no-archive": ""}
VOLATILE_KEYS = {"createdOn", "archiverVersion"}

MODEL_PY = """import torch
from torch import nn


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)
"""

HANDLER_PY = """def handle_fn(data, context):
    return [None] * len(data or [])
"""


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real inputs: an eager model (model.py + state_dict), a TorchScript model, handlers, extras, yaml."""
    torch = pytest.importorskip("torch")
    root = tmp_path_factory.mktemp("src")
    (root / "model.py").write_text(MODEL_PY)
    spec = importlib.util.spec_from_file_location("archiver_test_model", root / "model.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    net = module.TinyNet()
    torch.save(net.state_dict(), root / "model.pt")
    with warnings.catch_warnings():
        # torch 2.9+ deprecates TorchScript, but TorchServe users still archive TorchScript models.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.trace(net, torch.zeros(1, 4)).save(str(root / "scripted.pt"))
    (root / "handlers").mkdir()
    (root / "handlers" / "my_handler.py").write_text(HANDLER_PY)
    (root / "handlers" / "libcustom.so").write_bytes(b"\x7fELF, a stand-in for an LSP (C++) handler library")
    (root / "index_to_name.json").write_text('{"0": "a", "1": "b"}')
    extra = root / "extra_dir"
    for rel, text in {
        "vocab.txt": "x\ny\n",
        "sub/deep/data.bin": "\x00\x01",
        "sub/notes.md": "n",
        "__pycache__/junk.py": "j",
        ".git/config": "g",
        "sub/__MACOSX/m": "m",
    }.items():
        (extra / rel).parent.mkdir(parents=True, exist_ok=True)
        (extra / rel).write_text(text)
    (root / "requirements.txt").write_text("numpy\n")
    (root / "model-config.yaml").write_text("batchSize: 4\nmaxBatchDelay: 50\nhandler:\n  topk: 2\n")
    return root


def run_ours(src: Path, tmp_path: Path, *extra: str) -> Path:
    """servekit archive with small defaults ("m", version 1, model.pt, base_handler) that ``extra`` overrides."""
    defaults = {
        "--model-name": "m",
        "-v": "1",
        "--serialized-file": str(src / "model.pt"),
        "--handler": "base_handler",
        "--export-path": str(tmp_path / "out"),
    }
    flags = [*extra]
    for flag, value in defaults.items():
        if flag not in extra:
            flags += [flag, value]
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return run(parser.parse_args(flags))


def reference_archiver() -> str:
    found = shutil.which("torch-model-archiver") or str(Path(sys.executable).parent / "torch-model-archiver")
    assert Path(found).exists(), "torch-model-archiver 0.12 must be installed next to the test interpreter"
    return found


def archive_both(src: Path, tmp_path: Path, flags: list[str], monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """Run the reference and servekit with the same flags (relative paths, cwd=src); return both export dirs."""
    ref_out, our_out = tmp_path / "ref", tmp_path / "ours"
    ref_out.mkdir()
    done = subprocess.run(
        [reference_archiver(), *flags, "--export-path", str(ref_out)],
        cwd=src,
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    monkeypatch.chdir(src)
    assert main([*flags, "--export-path", str(our_out)]) == 0
    return ref_out, our_out


def read_archive(path: Path, fmt: str, name: str) -> dict[str, bytes]:
    """Archive member name -> content, for any of the four formats (tgz's top-level folder removed)."""
    if fmt == "no-archive":
        return {p.relative_to(path).as_posix(): p.read_bytes() for p in path.rglob("*") if p.is_file()}
    if fmt == "tgz":
        with tarfile.open(path) as tar:
            members = tar.getmembers()
            assert all(m.isfile() and m.name.startswith(f"{name}/") for m in members)  # no links, no dir entries
            return {m.name[len(name) + 1 :]: tar.extractfile(m).read() for m in members}  # type: ignore[union-attr]
    with zipfile.ZipFile(path) as archive:
        expected = zipfile.ZIP_STORED if fmt == "zip-store" else zipfile.ZIP_DEFLATED
        assert {info.compress_type for info in archive.infolist()} == {expected}
        return {info.filename: archive.read(info) for info in archive.infolist()}


def manifest_of(files: dict[str, bytes]) -> dict[str, object]:
    manifest: dict[str, object] = json.loads(files["MAR-INF/MANIFEST.json"])
    return manifest


def assert_same_archive(ref_out: Path, our_out: Path, fmt: str, name: str) -> dict[str, bytes]:
    target = f"{name}{SUFFIXES[fmt]}"
    assert sorted(p.name for p in our_out.iterdir()) == [target]
    ref = read_archive(ref_out / target, fmt, name)
    ours = read_archive(our_out / target, fmt, name)
    assert sorted(ours) == sorted(ref)
    for member in ref:
        if member != "MAR-INF/MANIFEST.json":
            assert ours[member] == ref[member], member
    ref_manifest, our_manifest = manifest_of(ref), manifest_of(ours)
    assert list(our_manifest) == list(ref_manifest)
    assert {k: v for k, v in our_manifest.items() if k not in VOLATILE_KEYS} == {
        k: v for k, v in ref_manifest.items() if k not in VOLATILE_KEYS
    }
    assert re.fullmatch(r"\d\d/\d\d/\d{4} \d\d:\d\d:\d\d", str(our_manifest["createdOn"]))
    assert our_manifest["archiverVersion"] == "0.12.0"
    our_text = (
        ours["MAR-INF/MANIFEST.json"].decode().replace(str(our_manifest["createdOn"]), str(ref_manifest["createdOn"]))
    )
    assert our_text == ref["MAR-INF/MANIFEST.json"].decode()  # same JSON layout, byte for byte
    return ours


@pytest.mark.parametrize("fmt", FORMATS)
def test_archiver_matches_reference_for_eager_model(
    src: Path, tmp_path: Path, fmt: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    flags = [
        "--model-name",
        "tiny",
        "-v",
        "1.0",
        "--model-file",
        "model.py",
        "--serialized-file",
        "model.pt",
        "--handler",
        "handlers/my_handler:handle_fn",
        "--extra-files",
        "index_to_name.json,extra_dir",
        "-r",
        "requirements.txt",
        "-c",
        "model-config.yaml",
        "--archive-format",
        fmt,
    ]
    ours = assert_same_archive(*archive_both(src, tmp_path, flags, monkeypatch), fmt, "tiny")
    assert sorted(ours) == [
        "MAR-INF/MANIFEST.json",
        "index_to_name.json",
        "model-config.yaml",
        "model.pt",
        "model.py",
        "my_handler.py",
        "requirements.txt",
        "sub/deep/data.bin",
        "sub/notes.md",
        "vocab.txt",
    ]
    assert manifest_of(ours)["model"] == {
        "modelName": "tiny",
        "serializedFile": "model.pt",
        "handler": "my_handler:handle_fn",
        "modelFile": "model.py",
        "modelVersion": "1.0",
        "requirementsFile": "requirements.txt",
        "configFile": "model-config.yaml",
    }


@pytest.mark.parametrize("fmt", FORMATS)
def test_archiver_matches_reference_for_torchscript_with_builtin_handler(
    src: Path, tmp_path: Path, fmt: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    flags = [
        "--model-name",
        "scripted",
        "--version",
        "2.1",
        "--serialized-file",
        "scripted.pt",
        "--handler",
        "base_handler",
        "--runtime",
        "python3",
        "--archive-format",
        fmt,
    ]
    ours = assert_same_archive(*archive_both(src, tmp_path, flags, monkeypatch), fmt, "scripted")
    assert sorted(ours) == ["MAR-INF/MANIFEST.json", "scripted.pt"]
    manifest = manifest_of(ours)
    assert manifest["runtime"] == "python3"
    assert manifest["model"] == {
        "modelName": "scripted",
        "serializedFile": "scripted.pt",
        "handler": "base_handler",
        "modelVersion": "2.1",
    }


def test_archiver_matches_reference_for_extra_file_glob(
    src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    flags = [
        "--model-name",
        "globbed",
        "-v",
        "1",
        "--serialized-file",
        "model.pt",
        "--handler",
        "base_handler",
        "--extra-files",
        "extra_dir/*.txt,*.yaml",
    ]
    ours = assert_same_archive(*archive_both(src, tmp_path, flags, monkeypatch), "default", "globbed")
    assert sorted(ours) == ["MAR-INF/MANIFEST.json", "model-config.yaml", "model.pt", "vocab.txt"]


@pytest.mark.parametrize("handler", ["BaseHandler", "handlers/libcustom:handle"])
def test_archiver_matches_reference_for_lsp_runtime(
    src: Path, tmp_path: Path, handler: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    flags = [
        "--model-name",
        "cpp",
        "-v",
        "1",
        "--serialized-file",
        "scripted.pt",
        "--handler",
        handler,
        "--runtime",
        "LSP",
    ]
    ours = assert_same_archive(*archive_both(src, tmp_path, flags, monkeypatch), "default", "cpp")
    assert ("libcustom.so" in ours) == (handler != "BaseHandler")


def test_archiver_records_handler_py_with_function_suffix(src: Path, tmp_path: Path) -> None:
    # The reference crashes on "path/x.py:fn" (it copies the literal "x.py:fn"); TorchServe's loader accepts it.
    out = run_ours(src, tmp_path, "--handler", str(src / "handlers" / "my_handler.py:handle_fn"))
    files = read_archive(out, "default", "m")
    assert files["my_handler.py"].decode() == HANDLER_PY
    assert manifest_of(files)["model"]["handler"] == "my_handler.py:handle_fn"  # type: ignore[index]


def test_archiver_builtin_handler_is_recorded_not_copied(
    src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "base_handler.py").write_text("raise SystemExit")  # a same-named local file must not be packed
    monkeypatch.chdir(tmp_path)
    files = read_archive(run_ours(src, tmp_path, "--handler", "base_handler"), "default", "m")
    assert sorted(files) == ["MAR-INF/MANIFEST.json", "model.pt"]
    assert manifest_of(files)["model"]["handler"] == "base_handler"  # type: ignore[index]


@pytest.mark.parametrize("fmt", FORMATS)
def test_archiver_needs_force_to_overwrite(src: Path, tmp_path: Path, fmt: str) -> None:
    first = run_ours(src, tmp_path, "--archive-format", fmt)
    before = read_archive(first, fmt, "m")
    with pytest.raises(ArchiveError, match="already exists; use -f/--force"):
        run_ours(src, tmp_path, "--archive-format", fmt, "--extra-files", str(src / "index_to_name.json"))
    assert read_archive(first, fmt, "m") == before
    again = run_ours(src, tmp_path, "--archive-format", fmt, "-f", "--extra-files", str(src / "extra_dir"))
    assert again == first
    assert "vocab.txt" in read_archive(again, fmt, "m")
    assert [p.name for p in (tmp_path / "out").iterdir()] == [first.name]


@pytest.mark.parametrize("name", ["_leading_underscore", ".hidden", "has space", "sl/ash", "", "trailing\n", "ünïcode"])
def test_archiver_rejects_bad_model_name(src: Path, tmp_path: Path, name: str) -> None:
    with pytest.raises(ArchiveError, match="Invalid model name"):
        run_ours(src, tmp_path, "--model-name", name)
    assert not (tmp_path / "out").exists()


def test_archiver_rejects_missing_serialized_file(
    src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = str(src / "nope.pt")
    with pytest.raises(ArchiveError, match=r"Serialized file not found.*nope\.pt"):
        run_ours(src, tmp_path, "--serialized-file", missing)
    argv = [
        "--model-name",
        "m",
        "-v",
        "1",
        "--handler",
        "base_handler",
        "--serialized-file",
        missing,
        "--export-path",
        str(tmp_path / "out"),
    ]
    assert main(argv) == 1
    assert "nope.pt" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "flag, label",
    [
        ("--model-file", "Model file"),
        ("--handler", "Handler file"),
        ("--extra-files", "Extra file"),
        ("-r", "Requirements file"),
        ("-c", "Config file"),
    ],
)
def test_archiver_rejects_missing_inputs(src: Path, tmp_path: Path, flag: str, label: str) -> None:
    with pytest.raises(ArchiveError, match=label):
        run_ours(src, tmp_path, flag, str(src / "missing_thing"))


def test_archiver_skips_unwanted_entries_found_in_directories(src: Path, tmp_path: Path) -> None:
    extra = tmp_path / "extra"
    for rel in [
        "keep.py",
        ".hidden",
        "x.pyc",
        ".DS_Store",
        "old.mar",
        ".venv/lib.py",
        "__pycache__/c.py",
        "__MACOSX/m",
        "pkg/mod.py",
        "pkg/.DS_Store",
        "pkg/__pycache__/mod.cpython-311.pyc",
    ]:
        (extra / rel).parent.mkdir(parents=True, exist_ok=True)
        (extra / rel).write_text(rel)
    (tmp_path / ".literal").write_text("named on the command line, so packed")
    out = run_ours(src, tmp_path, "--extra-files", f"{extra},{tmp_path / '.literal'}")
    assert sorted(read_archive(out, "default", "m")) == [
        ".literal",
        "MAR-INF/MANIFEST.json",
        "keep.py",
        "model.pt",
        "pkg/mod.py",
    ]


def test_archiver_writes_sorted_entries_with_manifest_last(src: Path, tmp_path: Path) -> None:
    out = run_ours(
        src,
        tmp_path,
        "--model-file",
        str(src / "model.py"),
        "--extra-files",
        str(src / "extra_dir"),
        "-c",
        str(src / "model-config.yaml"),
    )
    with zipfile.ZipFile(out) as archive:
        names = archive.namelist()
    assert names[:-1] == sorted(names[:-1]) and names[-1] == "MAR-INF/MANIFEST.json"


def test_archiver_creates_missing_export_path(src: Path, tmp_path: Path) -> None:
    out = run_ours(src, tmp_path, "--export-path", str(tmp_path / "a" / "b"))
    assert out == tmp_path / "a" / "b" / "m.mar" and zipfile.is_zipfile(out)


@pytest.mark.parametrize("fmt", FORMATS)
def test_archiver_failed_write_leaves_previous_archive_and_no_temp_files(src: Path, tmp_path: Path, fmt: str) -> None:
    first = run_ours(src, tmp_path, "--archive-format", fmt)
    before = read_archive(first, fmt, "m")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.txt").write_text("a")
    (broken / "z_dangling").symlink_to(tmp_path / "gone")  # fails mid-write, after a.txt was packed
    with pytest.raises(ArchiveError, match="Cannot write"):
        run_ours(src, tmp_path, "--archive-format", fmt, "-f", "--extra-files", str(broken))
    assert [p.name for p in (tmp_path / "out").iterdir()] == [first.name]
    assert read_archive(first, fmt, "m") == before


def test_archiver_tgz_has_single_top_level_folder_and_manifest_json(src: Path, tmp_path: Path) -> None:
    out = run_ours(src, tmp_path, "--archive-format", "tgz", "--model-name", "tg")
    assert out.name == "tg.tar.gz"
    with tarfile.open(out) as tar:
        assert {name.split("/")[0] for name in tar.getnames()} == {"tg"}
        manifest = json.load(io.BytesIO(tar.extractfile("tg/MAR-INF/MANIFEST.json").read()))  # type: ignore[union-attr]
    assert manifest["model"]["modelName"] == "tg"
