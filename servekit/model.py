"""Model: one registered model version, with its workers (``WorkerPool``) and its queue, which ``new_batcher``
chooses from its model config (plain, continuous or sequence batching). Runs in the front-end process.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from servekit.archive import ModelSpec
from servekit.batcher import Batcher
from servekit.continuous_batcher import ContinuousBatcher
from servekit.errors import BadRequestError
from servekit.metrics import ModelMetrics
from servekit.model_settings import ModelSettings
from servekit.oip import TensorSpec
from servekit.pool import WorkerPool
from servekit.process import WorkerProcess
from servekit.protocol import Request, Response, continuous_batching
from servekit.sequence import DEFAULT_KEYS, SequenceKeys, sequence_batching, sequence_policy
from servekit.sequence_batcher import SequenceBatcher


def new_batcher(
    spec: ModelSpec,
    pool: WorkerPool,
    settings: ModelSettings,
    metrics: ModelMetrics,
    keys: SequenceKeys = DEFAULT_KEYS,
) -> Batcher[WorkerProcess]:
    """The model's queue: a ``ContinuousBatcher`` when its model config says ``continuousBatching: true``, a
    ``SequenceBatcher`` (with the header names ``keys``) when it says ``sequenceBatching: true``; both is refused."""
    if sequence_batching(spec.config):
        if continuous_batching(spec.config):
            raise BadRequestError(
                f"model config of {spec.name}: sequenceBatching with continuousBatching (TorchServe's"
                " SequenceContinuousBatching) is not supported; set one of them"
            )
        policy = sequence_policy(spec.config, keys)
        return SequenceBatcher(spec.name, pool, settings.batch_size, settings.job_queue_size, metrics, policy)
    kind = ContinuousBatcher if continuous_batching(spec.config) else Batcher
    return kind(spec.name, pool, settings.batch_size, settings.job_queue_size, metrics)


@dataclass(eq=False)
class Model:
    """One registered model version."""

    spec: ModelSpec
    settings: ModelSettings
    url: str
    pool: WorkerPool
    batcher: Batcher[WorkerProcess]
    metrics: ModelMetrics
    inputs: tuple[TensorSpec, ...] = ()  # Open Inference Protocol metadata, from the model config
    outputs: tuple[TensorSpec, ...] = ()
    loaded_at_startup: bool = False
    downloaded: Path | None = None  # an archive fetched from a URL, removed with the model
    registered_at: float = field(default_factory=time.time)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def version(self) -> str:
        return self.spec.version

    async def infer(
        self, request: Request, timeout_s: float | None = None, hooks: set[Callable[[], Any]] | None = None
    ) -> Response:
        return await self.batcher.submit(request, timeout_s, hooks)
