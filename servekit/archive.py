"""Open a model archive safely: ``.mar``/``.zip``, ``.tar.gz``/``.tgz``, or an unpacked folder.

``open_archive`` returns a ``ModelSpec``: where the model's files are, its manifest and its model-config
YAML. Archives are extracted into a new private staging folder (mode 0700); an entry with an absolute
path, a ``..`` component, a link or a device, more than ``MAX_ENTRIES`` entries, more than
``MAX_TOTAL_BYTES`` in all, or a suspicious compression ratio is refused with ``ArchiveError`` before
anything is written, and the staging folder is removed. No handler code is imported here.
"""

from __future__ import annotations

import concurrent.futures
import functools
import json
import os
import re
import shutil
import stat
import tarfile
import tempfile
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from servekit.errors import ArchiveError, ArchiveNotFoundError

MAX_ENTRIES = 100_000
MAX_TOTAL_BYTES = 64 * 2**30
MAX_RATIO = 200  # uncompressed/compressed, for entries over 1 MiB
PARALLEL_BYTES = 4 * 2**20  # zip entries at least this large are extracted in threads, when there are several
MANIFEST = "MAR-INF/MANIFEST.json"
ARCHIVE_SUFFIXES = (".mar", ".zip", ".tar.gz", ".tgz", ".model")


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """A model's files on disk and what its manifest and model config say."""

    name: str
    version: str
    model_dir: Path
    manifest: dict[str, Any]
    config: dict[str, Any] = field(default_factory=dict)
    staging: Path | None = None  # the folder to remove when the model is unloaded
    source: Path | None = None  # the archive or folder it was opened from

    @property
    def handler(self) -> str:
        return str(self.manifest["model"].get("handler") or "")

    @property
    def runtime(self) -> str:
        return str(self.manifest.get("runtime", "python"))

    def remove_staging(self) -> None:
        if self.staging is not None:
            shutil.rmtree(self.staging, ignore_errors=True)


def default_name(path: Path) -> str:
    """The model name TorchServe derives from a location when the manifest has none."""
    name = path.name
    for suffix in (".mar", ".model"):
        name = name.removesuffix(suffix)
    return re.sub(r"\W", "_", name)


def open_archive(path: Path, name: str | None = None, staging_root: Path | None = None) -> ModelSpec:
    """Open the archive or folder at ``path``; ``name`` overrides the manifest's model name."""
    if path.is_dir():
        return _read_model_dir(_single_subdir(path), name or None, path, None)
    if not path.is_file():
        raise ArchiveNotFoundError(f"Model not found at: {path.name}")
    if staging_root is not None:
        staging_root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix="servekit-model-", dir=staging_root))
    try:
        target = staging / "model"
        target.mkdir()
        if zipfile.is_zipfile(path):
            _extract_zip(path, target)
        elif tarfile.is_tarfile(path):
            _extract_tar(path, target)
        else:
            raise ArchiveError(f"{path.name}: not a zip (.mar) or tar.gz archive")
        return _read_model_dir(_single_subdir(target), name, path, staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _check_member(archive: Path, member: str) -> None:
    pure = PurePosixPath(member.replace("\\", "/"))
    if pure.is_absolute() or ".." in pure.parts or re.match(r"^[A-Za-z]:", member):
        raise ArchiveError(f"{archive.name}: unsafe entry {member!r} (absolute path or '..')")


def _check_totals(archive: Path, count: int, total: int) -> None:
    if count > MAX_ENTRIES:
        raise ArchiveError(f"{archive.name}: {count} entries, more than the limit of {MAX_ENTRIES}")
    if total > MAX_TOTAL_BYTES:
        raise ArchiveError(f"{archive.name}: {total} bytes uncompressed, more than the limit of {MAX_TOTAL_BYTES}")


def _extract_zip(archive: Path, target: Path) -> None:
    try:
        with zipfile.ZipFile(archive) as zf:
            infos = zf.infolist()
            _check_totals(archive, len(infos), sum(i.file_size for i in infos))
            for info in infos:
                _check_member(archive, info.filename)
                kind = stat.S_IFMT(info.external_attr >> 16)  # 0: no Unix type recorded, a plain entry
                if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
                    raise ArchiveError(f"{archive.name}: entry {info.filename!r} is a link or special file")
                if info.file_size > 2**20 and info.file_size > MAX_RATIO * max(info.compress_size, 1):
                    raise ArchiveError(f"{archive.name}: entry {info.filename!r} has a suspicious compression ratio")
            large = [info for info in infos if info.file_size >= PARALLEL_BYTES]
            for info in infos:
                if info not in large or len(large) == 1:
                    zf.extract(info, target)
            if len(large) > 1:  # zlib and file writes release the GIL: large entries inflate side by side
                for info in large:  # their folders first, so that no two threads create one
                    (target / info.filename).parent.mkdir(parents=True, exist_ok=True)
                with concurrent.futures.ThreadPoolExecutor(min(len(large), os.cpu_count() or 1)) as threads:
                    list(threads.map(functools.partial(_extract_entry, archive, target), large))
    except (zipfile.BadZipFile, zlib.error, NotImplementedError, OSError, EOFError) as exc:
        raise ArchiveError(f"{archive.name}: corrupt archive ({exc})") from None


def _extract_entry(archive: Path, target: Path, info: zipfile.ZipInfo) -> None:
    with zipfile.ZipFile(archive) as zf:  # one handle per thread: each reads at its own offset
        zf.extract(info, target)


def _extract_tar(archive: Path, target: Path) -> None:
    try:
        with tarfile.open(archive) as tf:
            members = tf.getmembers()
            total = sum(m.size for m in members)
            _check_totals(archive, len(members), total)
            if total > 2**20 and total > MAX_RATIO * archive.stat().st_size:
                raise ArchiveError(f"{archive.name}: suspicious compression ratio ({total} bytes uncompressed)")
            for member in members:
                _check_member(archive, member.name)
                if not (member.isfile() or member.isdir()):
                    raise ArchiveError(f"{archive.name}: entry {member.name!r} is a link or special file")
            tf.extractall(target, filter="data")
    except (tarfile.TarError, zlib.error, OSError, EOFError) as exc:
        raise ArchiveError(f"{archive.name}: corrupt archive ({exc})") from None


def _single_subdir(folder: Path) -> Path:
    """TorchServe descends into a folder whose only content is one sub-folder (tgz archives)."""
    entries = [p for p in folder.iterdir() if not p.name.startswith(".")]
    if len(entries) == 1 and entries[0].is_dir() and entries[0].name != "MAR-INF":
        return entries[0]
    return folder


def _read_model_dir(model_dir: Path, name: str | None, source: Path, staging: Path | None) -> ModelSpec:
    manifest_path = model_dir / MANIFEST
    manifest: dict[str, Any] = {"runtime": "python", "model": {}}
    if manifest_path.is_file():
        try:
            manifest = json.loads(manifest_path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ArchiveError(f"{source.name}: {MANIFEST} is not valid JSON ({exc})") from None
    model = manifest.get("model") if isinstance(manifest, dict) else None
    if not isinstance(model, dict):
        raise ArchiveError(f"{source.name}: {MANIFEST} has no 'model' section")
    manifest.setdefault("runtime", "python")
    if manifest["runtime"] not in ("python", "python3"):
        raise ArchiveError(f"{source.name}: runtime {manifest['runtime']!r} is not supported (python, python3)")
    model_name = name or model.get("modelName") or default_name(source)
    version = str(model.get("modelVersion") or "1.0")
    model.setdefault("modelName", model_name)
    model.setdefault("modelVersion", version)
    config: dict[str, Any] = {}
    config_file = model.get("configFile")
    if config_file:
        config_path = (model_dir / config_file).resolve()
        if not config_path.is_relative_to(model_dir.resolve()):
            raise ArchiveError(f"{source.name}: model config {config_file!r} is outside the model folder")
        try:
            loaded = yaml.safe_load(config_path.read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise ArchiveError(f"{source.name}: cannot read model config {config_file} ({exc})") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ArchiveError(f"{source.name}: model config {config_file} must be a mapping")
        config = loaded or {}
    return ModelSpec(model_name, version, model_dir.resolve(), manifest, config, staging, source.resolve())
