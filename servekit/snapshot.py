"""Snapshots: the registered models written to disk after every change, and read back at start.

A snapshot is JSON ``{"created": <ms>, "models": {name: {version: {"defaultVersion", "marName", "minWorkers",
"maxWorkers", "batchSize", "maxBatchDelay", "responseTimeout", "startupTimeout", "jobQueueSize"}}}}`` (the
shape of TorchServe's ``model_snapshot``). It is replaced atomically (temp file, fsync, rename, fsync of the
folder), and the one before it is kept as ``.prev``, so a crash mid-write or a corrupt file falls back to the
previous snapshot with a loud error instead of a crash loop. Standard library only.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger("servekit.snapshot")

FILE_NAME = "snapshot.json"
FIELDS = ("minWorkers", "maxWorkers", "batchSize", "maxBatchDelay", "responseTimeout", "startupTimeout", "jobQueueSize")


def write(folder: Path, models: dict[str, dict[str, dict[str, Any]]]) -> Path:
    """Atomically replace the snapshot in ``folder`` with ``models``; returns its path."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / FILE_NAME
    data = json.dumps({"created": int(time.time() * 1000), "models": models}, indent=2).encode()
    fd, temp = tempfile.mkstemp(prefix=".snapshot-", dir=folder)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        if path.exists():  # keep the current one as .prev without ever removing it first
            link = folder / f".prev-{os.getpid()}"
            link.unlink(missing_ok=True)
            os.link(path, link)
            os.replace(link, folder / (FILE_NAME + ".prev"))
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    directory = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
    return path


def _parse(path: Path) -> dict[str, dict[str, dict[str, Any]]]:
    document = json.loads(path.read_text())
    models = document["models"]
    if not isinstance(models, dict):
        raise ValueError("'models' is not an object")
    for name, versions in models.items():
        if not isinstance(versions, dict):
            raise ValueError(f"model {name!r}: versions is not an object")
        for version, entry in versions.items():
            if not isinstance(entry, dict) or not isinstance(entry.get("marName"), str):
                raise ValueError(f"model {name!r} version {version!r}: no marName")
            for key in FIELDS:
                value = entry.get(key, 0)
                if not isinstance(value, int | float) or isinstance(value, bool):
                    raise ValueError(f"model {name!r} version {version!r}: {key} is not a number")
    return models


def read(folder: Path) -> dict[str, dict[str, dict[str, Any]]] | None:
    """The latest readable snapshot in ``folder``, or ``None`` if there is none. A corrupt snapshot is
    logged as an error and the previous one is used; if both are unreadable, ``None``."""
    for path in (folder / FILE_NAME, folder / (FILE_NAME + ".prev")):
        if not path.exists():
            continue
        try:
            return _parse(path)
        except (OSError, ValueError, KeyError, TypeError, RecursionError) as exc:
            logger.error("snapshot %s is unreadable (%s); trying the previous one", path, exc)
    return None
