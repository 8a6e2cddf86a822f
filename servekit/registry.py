"""ModelRegistry: the models being served, by name and version, each with its pool and batcher.

The registry resolves a model's effective settings (API parameters, then the archive's model-config
YAML, then the ``models`` entry of config.properties, then server defaults, as TorchServe does), starts
its workers, and answers lookups for the HTTP layer. Runs in the front-end process.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from servekit.archive import ModelSpec
from servekit.batcher import Batcher
from servekit.config import Settings, detect_gpu_count
from servekit.errors import BadRequestError, ModelNotFoundError, ModelVersionNotFoundError
from servekit.pool import PoolSettings, WorkerPool, WorkerProcess
from servekit.protocol import LoadCommand, Request, Response


@dataclass(frozen=True, slots=True)
class ModelSettings:
    """The effective settings of one model version."""

    min_workers: int
    max_workers: int
    batch_size: int = 1
    max_batch_delay: int = 100  # ms
    response_timeout: float = 120.0
    startup_timeout: float = 120.0
    job_queue_size: int = 100
    device_type: str = "cpu"
    gpu_ids: tuple[int, ...] = ()


def _int(source: str, key: str, value: Any, minimum: int = 0) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise BadRequestError(f"{source}: {key} must be an integer, got {value!r}") from None
    if number < minimum:
        raise BadRequestError(f"{source}: {key} must be at least {minimum}, got {number}")
    return number


def resolve_settings(spec: ModelSpec, settings: Settings, params: Mapping[str, Any] | None = None) -> ModelSettings:
    """Effective settings: ``params`` (API or ``--models``) > model-config YAML > ``models`` JSON > defaults."""
    yaml_config = spec.config
    json_config = settings.models.get(spec.name, {}).get(spec.version, {})
    params = params or {}

    def pick(param: str, yaml_key: str, default: Any, minimum: int = 0) -> int:
        for source, mapping, key in (
            ("parameter", params, param),
            ("model config", yaml_config, yaml_key),
            ("models", json_config, yaml_key),
        ):
            if mapping.get(key) is not None:
                return _int(source, key, mapping[key], minimum)
        return int(default)

    workers = pick("initial_workers", "minWorkers", settings.default_workers_per_model)
    max_workers = max(workers, pick("max_workers", "maxWorkers", workers))
    device_type = str(yaml_config.get("deviceType", "gpu")).lower()
    gpu_count = detect_gpu_count(settings)
    gpu_ids: tuple[int, ...] = ()
    if device_type != "cpu" and gpu_count:
        ids = yaml_config.get("deviceIds") or list(range(gpu_count))
        gpu_ids = tuple(_int("model config", "deviceIds", i) for i in ids)
    return ModelSettings(
        min_workers=workers,
        max_workers=max_workers,
        batch_size=pick("batch_size", "batchSize", 1, minimum=1),
        max_batch_delay=pick("max_batch_delay", "maxBatchDelay", 100),
        response_timeout=pick("response_timeout", "responseTimeout", settings.default_response_timeout, 1),
        startup_timeout=pick("startup_timeout", "startupTimeout", settings.default_startup_timeout, 1),
        job_queue_size=pick("job_queue_size", "jobQueueSize", settings.job_queue_size, 1),
        device_type="gpu" if gpu_ids else "cpu",
        gpu_ids=gpu_ids,
    )


def torch_threads(workers: int) -> int:
    """Intra-op threads per worker so that the workers and the front end share the cores."""
    cores = len(os.sched_getaffinity(0))
    return max(1, (cores - 1) // max(1, workers))


@dataclass(eq=False)
class Model:
    """One registered model version."""

    spec: ModelSpec
    settings: ModelSettings
    url: str
    pool: WorkerPool
    batcher: Batcher[WorkerProcess]
    loaded_at_startup: bool = False
    registered_at: float = field(default_factory=time.time)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def version(self) -> str:
        return self.spec.version

    async def infer(self, request: Request) -> Response:
        return await self.batcher.submit(request)


class ModelRegistry:
    """Models by name and version, and the default version of each name."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._models: dict[str, dict[str, Model]] = {}
        self._defaults: dict[str, str] = {}
        self.starting = True

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

    def healthy(self) -> bool:
        """Healthy once startup is done and every default version has its minimum of ready workers."""
        return not self.starting and all(m.pool.ready >= m.settings.min_workers for m in self.defaults())

    async def register(
        self, spec: ModelSpec, url: str, params: Mapping[str, Any] | None = None, loaded_at_startup: bool = False
    ) -> Model:
        """Start the model's workers and serve it; if they fail to load, nothing stays registered."""
        if spec.version in self._models.get(spec.name, {}):
            raise BadRequestError(f"Model version {spec.version} is already registered for model {spec.name}")
        model_settings = resolve_settings(spec, self.settings, params)
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
            )

        pool_settings = PoolSettings(
            response_timeout=model_settings.response_timeout,
            startup_timeout=model_settings.startup_timeout,
            max_response_size=self.settings.max_response_size,
            torch_threads=threads,
            gpu_ids=model_settings.gpu_ids,
        )
        pool = WorkerPool(command_for, pool_settings)
        batcher = Batcher(spec.name, pool, model_settings.batch_size, model_settings.job_queue_size)
        model = Model(spec, model_settings, url, pool, batcher, loaded_at_startup)
        versions = self._models.setdefault(spec.name, {})
        versions[spec.version] = model
        self._defaults.setdefault(spec.name, spec.version)
        try:
            await pool.scale(model_settings.min_workers)
        except BaseException:
            await self._remove(model)
            raise
        return model

    async def _remove(self, model: Model) -> None:
        versions = self._models.get(model.name, {})
        versions.pop(model.version, None)
        if not versions:
            self._models.pop(model.name, None)
            self._defaults.pop(model.name, None)
        elif self._defaults.get(model.name) == model.version:
            self._defaults[model.name] = next(iter(versions))
        await model.batcher.close(self.settings.unregister_model_timeout)
        await model.pool.close()
        model.spec.remove_staging()

    async def unregister(self, name: str, version: str | None = None) -> None:
        await self._remove(self.get(name, version))

    async def close(self) -> None:
        """Unregister everything (server shutdown)."""
        models = [m for versions in self._models.values() for m in versions.values()]
        await asyncio.gather(*(self._remove(m) for m in models))
