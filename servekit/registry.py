"""ModelRegistry: the models being served, by name and version, each with its pool and batcher.

The registry resolves a model's effective settings (``servekit.model_settings``), builds its ``Model``
(``servekit.model``), starts and scales its workers, keeps the default version of each name, and answers lookups
for the HTTP layer.
After every change that succeeds it calls ``on_change`` (the server writes a snapshot there).
Runs in the front-end process.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from servekit import forkserver
from servekit.archive import ModelSpec
from servekit.errors import (
    BadRequestError,
    ConflictError,
    DefaultVersionError,
    HandlerError,
    ModelNotFoundError,
    ModelVersionNotFoundError,
    RequestTimeoutError,
    ServekitError,
    ServiceUnavailableError,
    WorkerStartError,
)
from servekit.forkserver import ForkServer
from servekit.metrics import Metrics, ModelState
from servekit.model import Model, new_batcher
from servekit.model_settings import resolve_settings, torch_threads
from servekit.oip import specs_from_config
from servekit.pool import WorkerPool
from servekit.pool_queue import NO_WORKER
from servekit.process import PoolSettings, WorkerProcess
from servekit.protocol import Failure, LoadCommand, Request, Response, failure_message
from servekit.sequence import SequenceKeys
from servekit.settings import Settings

logger = logging.getLogger("servekit.registry")


class ModelRegistry:
    """Models by name and version, and the default version of each name."""

    def __init__(self, settings: Settings, metrics: Metrics, on_change: Callable[[], None] | None = None) -> None:
        self.settings = settings
        self.metrics = metrics
        self._models: dict[str, dict[str, Model]] = {}
        self._defaults: dict[str, str] = {}
        self._on_change = on_change or (lambda: None)
        self._background: set[asyncio.Task[None]] = set()
        self.starting = True
        self.draining = False
        # The zygote that workers are forked from (servekit.forkserver); the server starts it (``forks.start``).
        self.forks = ForkServer() if settings.fork_workers and forkserver.supported() else None
        self.sequence_keys = SequenceKeys(  # sequence batching's header names (servekit.sequence)
            settings.ts_header_key_sequence_id,
            settings.ts_header_key_sequence_start,
            settings.ts_header_key_sequence_end,
        )

    def get(self, name: str, version: str | None = None) -> Model:
        versions = self._models.get(name)
        if not versions:
            raise ModelNotFoundError(name)
        version = version or self._defaults[name]
        if version not in versions:
            raise ModelVersionNotFoundError(name, version)
        return versions[version]

    def versions(self, name: str) -> list[Model]:
        if name not in self._models:
            raise ModelNotFoundError(name)
        return list(self._models[name].values())

    def defaults(self) -> list[Model]:
        """The default version of every model, sorted by name."""
        return [self._models[name][self._defaults[name]] for name in sorted(self._models)]

    def states(self) -> list[ModelState]:
        """Queue depth and workers of every model version, for the metrics."""
        return [
            ModelState(m.name, m.version, m.batcher.depth, m.pool.ready, m.pool.busy, m.pool.restarts)
            for versions in list(self._models.values())
            for m in list(versions.values())
        ]

    def healthy(self) -> bool:
        """Healthy once startup is done, until shutdown starts, while every default version has its minimum
        of ready workers."""
        return (
            not self.starting
            and not self.draining
            and all(m.pool.ready >= m.settings.min_workers for m in self.defaults())
        )

    def default_version(self, name: str) -> str:
        self.get(name)
        return self._defaults[name]

    def snapshot(self) -> dict[str, dict[str, dict[str, Any]]]:
        """Every model version's location and settings, in the snapshot shape."""
        return {
            name: {
                version: {
                    "defaultVersion": version == self._defaults[name],
                    "marName": self._location(m),
                    "minWorkers": m.settings.min_workers,
                    "maxWorkers": m.settings.max_workers,
                    "batchSize": m.settings.batch_size,
                    "maxBatchDelay": m.settings.max_batch_delay,
                    "responseTimeout": m.settings.response_timeout,
                    "startupTimeout": m.settings.startup_timeout,
                    "jobQueueSize": m.settings.job_queue_size,
                }
                for version, m in versions.items()
            }
            for name, versions in sorted(self._models.items())
        }

    def _location(self, model: Model) -> str:
        """Where the model's archive is, relative to the model store when it is inside it."""
        source, store = model.spec.source, self.settings.model_store
        if source is None:
            return model.url
        if store is not None and source.is_relative_to(store):
            return str(source.relative_to(store))
        return str(source)

    async def register(
        self,
        spec: ModelSpec,
        url: str,
        params: Mapping[str, Any] | None = None,
        loaded_at_startup: bool = False,
        synchronous: bool = True,
        downloaded: Path | None = None,
        default_workers: int | None = None,
        keep_failed: bool = False,
    ) -> Model:
        """Serve a model version. Synchronously, this waits for its workers and, if they fail to load,
        leaves nothing registered and raises the handler's error; with ``keep_failed`` (TorchServe's management
        API) the model stays registered with no workers (``minWorkers`` and ``maxWorkers`` 0) and
        ``WorkerStartError`` is raised, the handler's error being logged. Asynchronously, the workers start in the
        background and the model is removed again if they fail. With no workers to start, the model is
        registered (and ``on_change`` called) before this returns, whatever ``synchronous`` says: its handler
        is first loaded when it is scaled up. ``default_workers`` is the worker count when neither ``params``
        nor the model's config say (see ``resolve_settings``)."""
        if spec.version in self._models.get(spec.name, {}):
            raise ConflictError(f"Model version {spec.version} is already registered for model {spec.name}")
        model_settings = resolve_settings(spec, self.settings, params, default_workers)
        try:
            inputs, outputs = specs_from_config(spec.config, "inputs"), specs_from_config(spec.config, "outputs")
        except ValueError as exc:
            raise BadRequestError(f"model config of {spec.name}: {exc}") from None
        threads = torch_threads(model_settings.max_workers)

        def command_for(gpu_id: int | None) -> LoadCommand:
            return LoadCommand(
                model_name=spec.name,
                model_dir=str(spec.model_dir),
                handler=spec.handler,
                manifest=spec.manifest,
                model_yaml_config=spec.config,
                batch_size=model_settings.batch_size,
                gpu_id=gpu_id,
                torch_threads=threads,
                decode_input_request=self.settings.decode_input_request,
                max_response_size=self.settings.max_response_size,
                envelope=self.settings.service_envelope,
            )

        pool_settings = PoolSettings(
            response_timeout=model_settings.response_timeout,
            startup_timeout=model_settings.startup_timeout,
            max_response_size=self.settings.max_response_size,
            gpu_ids=model_settings.gpu_ids,
            forks=self.forks,
        )
        model_metrics = self.metrics.model(spec.name, spec.version)

        def loaded(worker: WorkerProcess, seconds: float) -> None:
            self.metrics.worker_loaded(f"{worker.name}_{spec.version}", seconds)

        pool = WorkerPool(command_for, pool_settings, loaded)
        batcher = new_batcher(spec, pool, model_settings, model_metrics, self.sequence_keys)
        model = Model(
            spec, model_settings, url, pool, batcher, model_metrics, inputs, outputs, loaded_at_startup, downloaded
        )
        versions = self._models.setdefault(spec.name, {})
        versions[spec.version] = model
        self._defaults.setdefault(spec.name, spec.version)
        if synchronous or model_settings.min_workers == 0:
            await self._start_workers(model, keep_failed=keep_failed)
        else:
            self._in_background(self._start_workers(model, log_errors=True))
        return model

    async def _start_workers(self, model: Model, log_errors: bool = False, keep_failed: bool = False) -> None:
        try:
            async with model.lock:
                await model.pool.scale(model.settings.min_workers)
        except BaseException as exc:
            if keep_failed and isinstance(exc, ServekitError):
                logger.error(
                    "model %s version %s stays registered with no workers, as they failed to start: %s",
                    *(model.name, model.version, exc.message),
                )
                async with model.lock:
                    await model.pool.scale(0)  # any worker that did load stops too
                    model.settings = replace(model.settings, min_workers=0, max_workers=0)
                self._on_change()
                raise WorkerStartError(model.name, model.version) from None
            await self._remove(model)
            if log_errors and isinstance(exc, ServekitError):
                logger.error("model %s version %s removed: %s", model.name, model.version, exc.message)
                return
            raise
        self._on_change()

    def _in_background(self, work: Any) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def scale(self, model: Model, min_workers: int, max_workers: int, synchronous: bool) -> None:
        """Set the model's worker count to ``min_workers``; synchronously, wait and raise the handler's
        error if new workers fail to load."""
        if min_workers < 0:
            raise BadRequestError(f"min_worker must be at least 0, got {min_workers}")
        if max_workers < min_workers:
            raise BadRequestError("max_worker cannot be less than min_worker.")

        async def apply() -> None:
            async with model.lock:
                previous = model.settings
                model.settings = replace(previous, min_workers=min_workers, max_workers=max_workers)
                try:
                    await model.pool.scale(min_workers)
                except BaseException:
                    model.settings = previous  # a failed scale-up leaves the model as it was
                    await model.pool.scale(previous.min_workers)
                    raise
            self._on_change()

        if synchronous:
            await apply()
        else:
            self._in_background(self._logged(apply(), f"scaling {model.name} version {model.version}"))

    @staticmethod
    async def _logged(work: Any, what: str) -> None:
        try:
            await work
        except ServekitError as exc:
            logger.error("%s failed: %s", what, exc.message)

    def set_default(self, name: str, version: str) -> None:
        if name not in self._models:
            raise ModelNotFoundError(name)
        if version not in self._models[name]:  # TorchServe's set-default wording, without its other 404s' colons
            raise ModelVersionNotFoundError(name, version, f"Model version {version} does not exist for model {name}")
        self._defaults[name] = version
        self._on_change()

    def _detach(self, model: Model) -> None:
        versions = self._models.get(model.name, {})
        versions.pop(model.version, None)
        if not versions:
            self._models.pop(model.name, None)
            self._defaults.pop(model.name, None)
        elif self._defaults.get(model.name) == model.version:
            self._defaults[model.name] = next(iter(versions))

    @staticmethod
    def _discard_files(model: Model) -> None:
        model.spec.remove_staging()
        if model.downloaded is not None:
            model.downloaded.unlink(missing_ok=True)

    async def _remove(self, model: Model, timeout: float | None = None) -> None:
        """Take the model out, let what is queued run for ``timeout`` (default ``unregister_model_timeout``), stop
        the workers (each gets ``timeout``, default ``response_timeout``) and remove its files."""
        self._detach(model)
        await model.batcher.close(self.settings.unregister_model_timeout if timeout is None else timeout)
        await model.pool.close(timeout)
        self._discard_files(model)

    async def unregister(self, name: str, version: str | None = None) -> Model:
        """Stop admitting, let what is queued and running finish, stop the workers and remove the staging folder,
        all within ``unregister_model_timeout``; what is still queued then is answered 503. Workers that have not
        exited by then are killed and ``RequestTimeoutError`` (408) raised, as TorchServe answers; the model then
        stays registered with no workers (``minWorkers`` and ``maxWorkers`` 0), as TorchServe keeps it, and another
        unregister removes it. The default version cannot go while other versions remain."""
        model = self.get(name, version)
        if len(self._models[name]) > 1 and self._defaults[name] == model.version:
            raise DefaultVersionError(f"Cannot remove default version for model {name}")
        timeout = self.settings.unregister_model_timeout
        deadline = time.monotonic() + timeout
        self._detach(model)
        await model.batcher.close(timeout)
        if not await model.pool.close(max(0.0, deadline - time.monotonic())):
            self._keep_without_workers(model)
            self._on_change()
            raise RequestTimeoutError(f"Timed out while cleaning resources: {name}")
        self._discard_files(model)
        self._on_change()
        return model

    async def describe_handle(self, model: Model, request: Request) -> Response:
        """The handler's own description of ``model`` (``GET /models/{m}?customized=true``, TorchServe's
        ``describe_handle``): the first free worker runs the handler on ``request`` (no inputs; the worker sets the
        ``describe`` header), ahead of the batches queued. ``ServiceUnavailableError`` while the model has no worker;
        a handler that fails is a ``HandlerError``, as for a batch."""
        no_worker = ServiceUnavailableError(
            f'Model "{model.name}" has no worker to serve describe request.'
            " Please use scale workers API to add workers."
        )
        reason = model.pool.unavailable()
        if reason is not None:
            raise no_worker if reason == NO_WORKER else ServiceUnavailableError(f'Model "{model.name}" {reason}')
        try:
            result = await model.pool.describe(request)
        except ServiceUnavailableError:
            raise no_worker from None
        for record in result.metrics:
            self.metrics.record(model.name, record)
        if isinstance(result.outcome, Failure):
            raise HandlerError(failure_message(model.name, result.outcome), result.outcome.status)
        return result.outcome[0]

    def _keep_without_workers(self, model: Model) -> None:
        """A model whose unregister timed out, back in the registry with no workers and a new queue (unless the
        same version was registered again meanwhile: then it goes)."""
        versions = self._models.setdefault(model.name, {})
        if model.version in versions:
            self._discard_files(model)
            return
        model.settings = replace(model.settings, min_workers=0, max_workers=0)
        model.pool.reopen()
        model.batcher = new_batcher(model.spec, model.pool, model.settings, model.metrics, self.sequence_keys)
        versions[model.version] = model
        self._defaults.setdefault(model.name, model.version)

    async def close(self, timeout: float) -> None:
        """Unregister everything (server shutdown, after the drain): what is still queued gets ``timeout`` seconds,
        and so do the workers to exit before they are killed."""
        for task in list(self._background):
            task.cancel()
        models = [m for versions in self._models.values() for m in versions.values()]
        await asyncio.gather(*(self._remove(m, timeout) for m in models))
        if self.forks is not None:
            await self.forks.close(timeout)
