"""What the management APIs say about the models: TorchServe 0.12's describe fields of a model version
(``describe``), the handler's own description as TorchServe passes it on (``customized_metadata``), and a page of
the model list (``model_page``). Shared by REST (``servekit.api.management``) and gRPC (``servekit.grpc.management``).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from servekit.api import lenient
from servekit.model import Model
from servekit.registry import ModelRegistry

PARALLEL_TYPES = ("pp", "tp", "pptp", "custom")


def yaml_int(config: Mapping[str, Any], key: str, default: int, minimum: int = 0) -> int:
    """An integer of the model-config YAML as TorchServe's ``ModelConfig`` reads it: ``default`` unless it is an
    integer (not a boolean), then at least ``minimum``."""
    value = config.get(key)
    if isinstance(value, int) and not isinstance(value, bool):
        return max(minimum, value)
    return default


def model_config_fields(config: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The describe fields TorchServe 0.12 reads from the model-config YAML (``ModelConfig`` and ``Model``), with its
    defaults and in its order: those before ``deviceType`` and those after it. The sequence settings count only when
    ``sequenceMaxIdleMSec`` is over 0, as in TorchServe."""
    level = yaml_int(config, "parallelLevel", 0)
    torchrun = config.get("torchrun")
    if isinstance(torchrun, dict):
        level = yaml_int(torchrun, "nproc-per-node", 1)
    kind = str(config.get("parallelType", "")).lower() if isinstance(config.get("parallelType"), str) else ""
    parallel = level > 0 and kind in PARALLEL_TYPES
    idle = yaml_int(config, "sequenceMaxIdleMSec", 0)
    return {
        "maxRetryTimeoutInSec": yaml_int(config, "maxRetryTimeoutInSec", 300),
        "clientTimeoutInMills": yaml_int(config, "clientTimeoutInMills", 0),
        "parallelType": kind if parallel else "",
        "parallelLevel": level if parallel else 0,
    }, {
        "continuousBatching": config.get("continuousBatching") is True,
        "useJobTicket": config.get("useJobTicket") is True,
        "useVenv": config.get("useVenv") is True,
        "stateful": config.get("sequenceBatching") is True,
        "sequenceMaxIdleMSec": idle,
        "sequenceTimeoutMSec": yaml_int(config, "sequenceTimeoutMSec", 0) if idle else 0,
        "maxNumSequence": yaml_int(config, "maxNumSequence", 1, minimum=1) if idle else 0,
        "maxSequenceJobQueueSize": yaml_int(config, "maxSequenceJobQueueSize", 1, minimum=1) if idle else 0,
    }


def describe(model: Model) -> dict[str, Any]:
    """TorchServe's describe fields for one model version, in its order (``DescribeModelResponse``)."""
    s = model.settings
    before_device, after_device = model_config_fields(model.spec.config)
    return {
        "modelName": model.name,
        "modelVersion": model.version,
        "modelUrl": model.url,
        "runtime": model.spec.runtime,
        "minWorkers": s.min_workers,
        "maxWorkers": s.max_workers,
        "batchSize": s.batch_size,
        "maxBatchDelay": s.max_batch_delay,
        "responseTimeout": int(s.response_timeout),
        "startupTimeout": int(s.startup_timeout),
        **before_device,
        "deviceType": s.device_type,
        **({"deviceIds": list(s.gpu_ids)} if s.gpu_ids else {}),
        **after_device,
        "loadedAtStartup": model.loaded_at_startup,
        "workers": [
            {
                "id": w.id,
                "startTime": datetime.fromtimestamp(w.start_time, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z",
                "status": w.status,
                "memoryUsage": w.memory_usage(),
                "pid": w.pid,
                "gpu": w.gpu_id is not None,
                "gpuUsage": "N/A",
            }
            for w in model.pool.workers
        ],
        "jobQueueStatus": {
            "remainingCapacity": s.job_queue_size - model.batcher.depth,
            "pendingRequests": model.batcher.depth,
        },
    }


def customized_metadata(payload: bytes) -> dict[str, Any]:
    """What the handler's ``describe_handle`` answered, as TorchServe reads and writes it again (Gson): a JSON object,
    or the JSON text of one, read leniently, without its members whose value is ``null`` (at any depth; ``null`` in
    a list stays); anything else (a plain string, ``None``, a list, a number) as ``{}``."""
    try:
        value = lenient.loads(payload.decode(errors="replace"))
    except (ValueError, RecursionError):
        return {}
    return without_nulls(value) if isinstance(value, dict) else {}


def without_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [without_nulls(v) for v in value]
    return value


def model_page(registry: ModelRegistry, size: int, start: int) -> dict[str, Any]:
    """A page of the model list (REST's ``GET /models``, gRPC's ``ListModels``): the default version of ``size``
    models by name from the ``start``-th, and the next page's token when more follow."""
    models = registry.defaults()
    page = [{"modelName": m.name, "modelUrl": m.url} for m in models[start : start + size]]
    if start + size < len(models):
        return {"nextPageToken": str(start + size), "models": page}
    return {"models": page}
