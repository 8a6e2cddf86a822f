"""``servekit archive``: write model archives as ``torch-model-archiver`` 0.12 does (same flags, same layout, same
``MAR-INF/MANIFEST.json``), so TorchServe loads them. Standard library only. Guarantees beyond the reference tool:

- every input is checked before anything is written; problems raise ``ArchiveError`` naming the path;
- the output appears atomically (built under a hidden temporary name in the export directory, then renamed): a failed
  run leaves no partial output and no temporary files, and an archive replaced with ``--force`` stays intact until
  the new one is complete;
- entries are written in sorted order, the manifest last;
- inside ``--extra-files`` directories, and among glob matches, hidden, ``*.pyc``, ``.DS_Store`` and ``*.mar`` files
  are skipped too (the reference skips only hidden, ``__pycache__`` and ``__MACOSX`` directories); a file named
  literally is always packed;
- ``--handler x.py:fn`` works (the reference only accepts ``x:fn``); ``--export-path`` is created when missing.
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import logging
import os
import re
import shutil
import sys
import tarfile
import tempfile
import zipfile
from datetime import datetime
from pathlib import Path

from servekit.errors import ArchiveError

# The torch-model-archiver release whose format this module reproduces; TorchServe reads the field as such.
ARCHIVER_VERSION = "0.12.0"
MANIFEST_NAME = "MAR-INF/MANIFEST.json"
MODEL_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_\-.]*")
SUFFIXES = {"default": ".mar", "zip-store": ".mar", "tgz": ".tar.gz", "no-archive": ""}
# Handler names that TorchServe resolves itself (model_archiver.model_packaging_utils.model_handlers), and servekit's
# own built-in "tensor" (servekit.handler.BUILTIN_HANDLERS; an archive naming it loads in servekit only).
PYTHON_BUILTIN_HANDLERS = frozenset({"base_handler", "text_classifier", "image_classifier", "object_detector"})
PYTHON_BUILTIN_HANDLERS |= {"image_segmenter", "dali_image_classifier", "vllm_handler", "trt_llm_handler", "tensor"}
LSP_BUILTIN_HANDLERS = frozenset({"BaseHandler", "TorchScriptHandler"})
SKIPPED_DIRS = {"__pycache__", "__MACOSX"}
SKIPPED_SUFFIXES = (".pyc", ".DS_Store", ".mar")

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add torch-model-archiver 0.12's flags, with its names, defaults and choices."""
    parser.add_argument("--model-name", required=True, help="name of the model; the archive is <model-name>.mar")
    parser.add_argument("--serialized-file", help="state_dict (.pt/.pth), TorchScript, ONNX or any weights file")
    parser.add_argument("--model-file", help="Python file defining the model's single nn.Module class (eager mode)")
    parser.add_argument("--handler", required=True, help="built-in handler name or handler .py path[:function]")
    parser.add_argument("--extra-files", help="comma separated files, directories (packed by content) or globs")
    parser.add_argument("--runtime", default="python", choices=["python", "python3", "LSP"])
    parser.add_argument("--export-path", help="directory to write into (default: current directory)")
    parser.add_argument("--archive-format", default="default", choices=["tgz", "no-archive", "zip-store", "default"])
    parser.add_argument("-f", "--force", action="store_true", help="overwrite an existing archive")
    parser.add_argument("-v", "--version", required=True, help="model version")
    parser.add_argument("-r", "--requirements-file", help="requirements.txt with the model's Python dependencies")
    parser.add_argument("-c", "--config-file", help="model-config YAML (batchSize, handler section, ...)")


def run(args: argparse.Namespace) -> Path:
    """Write the archive described by ``args`` and return its path (a file, or a folder for no-archive)."""
    name, fmt = args.model_name, args.archive_format
    if not MODEL_NAME_PATTERN.fullmatch(name or ""):
        raise ArchiveError(f"Invalid model name {name!r}: it must match ^[A-Za-z0-9][A-Za-z0-9_\\-.]*$")
    if fmt not in SUFFIXES:
        raise ArchiveError(f"Unknown archive format {fmt!r}; expected one of {', '.join(SUFFIXES)}")
    export = Path(args.export_path or os.getcwd())
    if export.exists() and not export.is_dir():
        raise ArchiveError(f"Export path {export} is not a directory")
    target = export / f"{name}{SUFFIXES[fmt]}"
    if os.path.lexists(target) and not args.force:
        raise ArchiveError(f"{target} already exists; use -f/--force to overwrite it")
    entries = _collect_entries(args)
    manifest = _manifest(args)
    try:
        export.mkdir(parents=True, exist_ok=True)
        if fmt == "no-archive":
            _write_folder(target, entries, manifest)
        else:
            _write_file(target, entries, manifest, fmt, name)
    except OSError as exc:
        raise ArchiveError(f"Cannot write {target}: {exc}") from exc
    return target


def main(argv: list[str] | None = None) -> int:
    """Standalone entry point, ``torch-model-archiver`` compatible; returns the exit status."""
    parser = argparse.ArgumentParser(prog="servekit archive", description="Write a TorchServe model archive.")
    add_arguments(parser)
    try:
        run(parser.parse_args(argv))
    except ArchiveError as exc:
        print(f"servekit archive: error: {exc.message}", file=sys.stderr)
        return 1
    return 0


def _manifest(args: argparse.Namespace) -> str:
    """MANIFEST.json text, field for field (and byte for byte, apart from the clock) as the reference writes it."""
    fields = {
        "modelName": args.model_name,
        "serializedFile": args.serialized_file,
        "handler": args.handler,
        "modelFile": args.model_file,
        "modelVersion": args.version,
        "requirementsFile": args.requirements_file,
        "configFile": args.config_file,
    }
    # Values are base names; a handler keeps its ":function" suffix. Missing optional keys are omitted.
    model = {
        key: value if key in ("modelName", "modelVersion") else os.path.basename(value)
        for key, value in fields.items()
        if value
    }
    document = {
        "createdOn": datetime.now().strftime("%d/%m/%Y %H:%M:%S"),
        "runtime": args.runtime,
        "model": model,
        "archiverVersion": ARCHIVER_VERSION,
    }
    return json.dumps(document, indent=2)


def _collect_entries(args: argparse.Namespace) -> dict[str, Path]:
    """Archive name -> source file, in the reference's copy order (a later input of the same name wins)."""
    entries: dict[str, Path] = {}

    def add_file(label: str, value: str | None) -> None:
        if value:
            path = Path(value)
            if not path.is_file():
                raise ArchiveError(f"{label} not found or not a file: {value}")
            entries[path.name] = path

    add_file("Model file", args.model_file)
    add_file("Serialized file", args.serialized_file)
    add_file("Handler file", _handler_file(args.handler, args.runtime))
    for item in (args.extra_files or "").split(","):
        item = item.strip()
        if not item:
            continue
        if Path(item).exists():
            matches, literal = [item], True
        elif glob.has_magic(item):
            matches, literal = sorted(glob.glob(item)), False
            if not matches:
                logger.warning("--extra-files pattern %r matched nothing", item)
        else:
            raise ArchiveError(f"Extra file not found: {item}")
        for match in map(Path, matches):
            if match.is_dir():
                entries.update(_walk(match))
            elif not match.is_file():
                raise ArchiveError(f"Extra file is neither a file nor a directory: {match}")
            elif literal or _wanted(match.name):
                entries[match.name] = match
    add_file("Requirements file", args.requirements_file)
    add_file("Config file", args.config_file)
    entries.pop(MANIFEST_NAME, None)  # the generated manifest always wins
    return dict(sorted(entries.items()))


def _handler_file(handler: str, runtime: str) -> str | None:
    """The file a handler argument names, or None for a built-in handler."""
    if handler in (LSP_BUILTIN_HANDLERS if runtime == "LSP" else PYTHON_BUILTIN_HANDLERS):
        return None
    path = handler.split(":")[0]
    suffix = ".py" if runtime != "LSP" else ".dylib" if sys.platform == "darwin" else ".so"
    return path if path.endswith(suffix) else path + suffix


def _walk(root: Path) -> dict[str, Path]:
    """Files under ``root`` by path relative to it, without unwanted files and directories."""
    found: dict[str, Path] = {}
    for current, dirs, files in os.walk(root, followlinks=True):
        dirs[:] = [d for d in dirs if d not in SKIPPED_DIRS and not d.startswith(".")]
        for file in files:
            if _wanted(file):
                path = Path(current, file)
                found[path.relative_to(root).as_posix()] = path
    return found


def _wanted(file_name: str) -> bool:
    return not file_name.startswith(".") and not file_name.endswith(SKIPPED_SUFFIXES)


def _write_file(target: Path, entries: dict[str, Path], manifest: str, fmt: str, name: str) -> None:
    fd, temp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as stream:
            if fmt == "tgz":
                with tarfile.open(name=target.name, mode="w:gz", fileobj=stream, dereference=True) as tar:
                    for arcname, source in entries.items():
                        tar.add(source, arcname=f"{name}/{arcname}", recursive=False)
                    data = manifest.encode()
                    info = tarfile.TarInfo(f"{name}/{MANIFEST_NAME}")
                    info.size, info.mtime, info.mode = len(data), int(datetime.now().timestamp()), 0o644
                    tar.addfile(info, io.BytesIO(data))
            else:
                compression = zipfile.ZIP_STORED if fmt == "zip-store" else zipfile.ZIP_DEFLATED
                with zipfile.ZipFile(stream, "w", compression) as archive:
                    for arcname, source in entries.items():
                        archive.write(source, arcname)
                    archive.writestr(MANIFEST_NAME, manifest)
        os.chmod(temp, 0o644)
        os.replace(temp, target)
    except BaseException:
        os.unlink(temp)
        raise


def _write_folder(target: Path, entries: dict[str, Path], manifest: str) -> None:
    temp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    old = target.with_name(f"{temp.name}.old")
    try:
        for arcname, source in entries.items():
            (temp / arcname).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, temp / arcname)
        (temp / "MAR-INF").mkdir(exist_ok=True)
        (temp / MANIFEST_NAME).write_text(manifest)
        temp.chmod(0o755)
        if os.path.lexists(target):
            target.rename(old)
        temp.rename(target)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        if os.path.lexists(old) and not os.path.lexists(target):
            old.rename(target)  # put the previous output back
        raise
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old)
    elif os.path.lexists(old):
        old.unlink()
