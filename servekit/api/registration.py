"""Registering a model through the management APIs (REST ``POST /models``, gRPC ``RegisterModel``, the Open
Inference Protocol's repository ``load``): the model API switch, the archive a registration names (in the model store
or downloaded), and TorchServe's status code and message.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import unquote, urlsplit

from servekit.archive import ModelSpec, open_archive
from servekit.download import download, is_remote
from servekit.errors import ArchiveNotFoundError, BadRequestError, MethodNotAllowedError, WorkerStartError
from servekit.model_settings import registration_workers
from servekit.registry import ModelRegistry
from servekit.settings import Settings

PROCESSING = {"status": "Processing worker updates..."}


def local_archive(url: str, store: Path) -> Path:
    """A model store entry named by ``url`` (a name, a relative path, or ``file://`` inside the store)."""
    path_text = unquote(urlsplit(url).path) if url.startswith("file://") else url
    path = Path(path_text)
    if ".." in PurePosixPath(path_text).parts:
        raise ArchiveNotFoundError(f"Relative path is not allowed in url: {url}")  # TorchServe's 404 and words
    resolved = (path if path.is_absolute() else store / path).resolve()
    if not resolved.is_relative_to(store.resolve()):
        raise BadRequestError(f"Model url {url} is outside the model store")
    return resolved


def check_model_api(settings: Settings) -> None:
    """Raise ``MethodNotAllowedError`` unless registering and unregistering models is on (``enable_model_api``)."""
    if not settings.enable_model_api:
        raise MethodNotAllowedError("Model API is disabled: start servekit with --enable-model-api")


async def load_spec(settings: Settings, params: Mapping[str, Any]) -> tuple[ModelSpec, str, Path | None]:
    """Open the archive a registration names (``url``; ``model_name``, ``handler``, ``runtime`` override its
    manifest): its spec, the url, and the file downloaded for it if it was remote."""
    url = params.get("url")
    if url is None:
        raise BadRequestError("Parameter url is required.")
    if not isinstance(url, str):
        raise BadRequestError(f"Parameter url must be a string, got {url!r}")
    if not url:
        raise ArchiveNotFoundError("empty url")  # TorchServe's 404 and words
    if settings.model_store is None:
        raise BadRequestError("Model store has not been configured.")
    runtime = params.get("runtime")
    if runtime is not None and runtime not in ("python", "python3"):
        raise BadRequestError(f"Parameter runtime must be python or python3, got {runtime!r}")
    downloaded = None
    if is_remote(url):
        downloaded = await download(url, settings.model_store, settings)
        path = downloaded
    else:
        path = local_archive(url, settings.model_store)
        if not path.exists():
            raise ArchiveNotFoundError(f"Model not found at: {url}")
    try:
        spec = await asyncio.to_thread(open_archive, path, params.get("model_name") or None)
    except BaseException:
        if downloaded is not None:
            downloaded.unlink(missing_ok=True)
        raise
    model_section = spec.manifest["model"]
    if params.get("handler"):
        model_section["handler"] = str(params["handler"])
    if runtime is not None:
        spec.manifest["runtime"] = runtime
    return spec, url, downloaded


async def register_model(
    registry: ModelRegistry, params: Mapping[str, Any], overrides: Mapping[str, int | None], synchronous: bool
) -> tuple[int, str]:
    """Register the model of ``params`` (see ``load_spec``) with the ``overrides`` of its settings: REST's
    ``POST /models`` and gRPC's ``RegisterModel``. Returns TorchServe's status code and message."""
    check_model_api(registry.settings)
    spec, url, downloaded = await load_spec(registry.settings, params)
    try:
        model = await registry.register(
            spec,
            url,
            overrides,
            synchronous=synchronous,
            downloaded=downloaded,
            default_workers=registration_workers(registry.settings),
            keep_failed=True,
        )
    except WorkerStartError:
        raise  # registered all the same, with no workers: its files stay
    except BaseException:
        spec.remove_staging()
        if downloaded is not None:
            downloaded.unlink(missing_ok=True)
        raise
    n = model.settings.min_workers
    message = f'Model "{model.name}" Version: {model.version} registered with {n} initial workers'
    if n == 0:  # 200 even with synchronous=false, as TorchServe: there is nothing to wait for
        return 200, message + ". Use scale workers API to add workers for the model."
    if not synchronous:
        return 202, PROCESSING["status"]
    return 200, message
