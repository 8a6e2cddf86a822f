"""A model version's effective settings (``ModelSettings``): a registration's parameters, then the archive's
model-config YAML, then the ``models`` entry of config.properties, then the server's defaults, as TorchServe resolves
them; and the torch threads of each of its workers. Runs in the front-end process.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from servekit.archive import ModelSpec
from servekit.config import detect_gpu_count
from servekit.errors import BadRequestError
from servekit.settings import Settings


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


def integer(label: str, value: Any, minimum: int = 0) -> int:
    """``value`` as an integer of at least ``minimum``, or 400 saying what ``label`` must be."""
    try:
        number = int(value)
    except (TypeError, ValueError, OverflowError):
        raise BadRequestError(f"{label} must be an integer, got {value!r}") from None
    if number < minimum:
        raise BadRequestError(f"{label} must be at least {minimum}, got {number}")
    return number


def registration_workers(settings: Settings) -> int:
    """The workers of a management API registration that names no ``initial_workers`` and whose model-config YAML
    sets no ``minWorkers``: ``default_workers_per_model`` when the configuration sets it, else 0, as in TorchServe
    (its ``getConfiguredDefaultWorkersPerModel``). Startup models get ``default_workers_per_model`` (default 1)."""
    return settings.default_workers_per_model if settings.raw.get("default_workers_per_model") else 0


def resolve_settings(
    spec: ModelSpec, settings: Settings, params: Mapping[str, Any] | None = None, default_workers: int | None = None
) -> ModelSettings:
    """Effective settings: ``params`` (API or ``--models``) > model-config YAML > ``models`` JSON > defaults
    (``default_workers``, else ``default_workers_per_model``, for the workers)."""
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
                return integer(f"{source}: {key}", mapping[key], minimum)
        return int(default)

    if default_workers is None:
        default_workers = settings.default_workers_per_model
    workers = pick("initial_workers", "minWorkers", default_workers)
    max_workers = max(workers, pick("max_workers", "maxWorkers", workers))
    device_type = str(yaml_config.get("deviceType", "gpu")).lower()
    gpu_count = detect_gpu_count(settings)
    gpu_ids: tuple[int, ...] = ()
    if device_type != "cpu" and gpu_count:
        ids = yaml_config.get("deviceIds") or list(range(gpu_count))
        gpu_ids = tuple(integer("model config: deviceIds", i) for i in ids)
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


def available_cpus(cgroup: Path = Path("/sys/fs/cgroup/cpu.max")) -> int:
    """The cores this process may use: its CPU affinity, capped by a cgroup v2 CPU quota (a container's CPU
    limit), which the affinity does not show."""
    cores = len(os.sched_getaffinity(0))
    try:
        quota, period = cgroup.read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return cores


def torch_threads(workers: int) -> int:
    """Intra-op threads per worker so that the workers and the front end share the cores. ``OMP_NUM_THREADS`` in
    the server's environment, when set, is used as it is."""
    explicit = os.environ.get("OMP_NUM_THREADS", "")
    if explicit.isdigit() and int(explicit) > 0:
        return int(explicit)
    return max(1, (available_cpus() - 1) // max(1, workers))
