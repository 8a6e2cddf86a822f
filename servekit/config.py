"""Server settings: config.properties, then the environment, then command-line flags.

This is the only module that reads the environment or a config file for the server. Everything is
parsed once, at start, into the frozen ``Settings``; a value that cannot be parsed is a
``ConfigError`` naming the key, never a silent default.

Keys and defaults follow TorchServe 0.12's ``config.properties`` (``../shared/reference/torchserve.md`` §6).
Environment variables ``TS_<KEY>`` are read only when ``enable_envvars_config=true``, as in TorchServe.
The docstring of each ``Settings`` field is its user documentation: ``docs/configuration.md`` is generated from them
(``docs/gen_config_reference.py``).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import urlsplit

from servekit.errors import ConfigError


@dataclass(frozen=True, slots=True)
class Address:
    """A listening address parsed from ``http://host:port``."""

    host: str
    port: int

    @classmethod
    def parse(cls, key: str, value: str) -> Address:
        parts = urlsplit(value if "://" in value else f"http://{value}")
        try:
            port = parts.port
        except ValueError:
            port = None
        if parts.scheme != "http" or not parts.hostname or port is None:
            raise ConfigError(f"{key}: expected http://host:port, got {value!r}")
        return cls(parts.hostname, port)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the server needs to start, read once."""

    inference_address: Address = Address("127.0.0.1", 8080)
    """Where the inference API listens: ``/ping``, ``/predictions``, the Open Inference Protocol (KServe v2) and
    KServe v1. ``http://host:port`` only (no HTTPS, no ``unix:`` sockets)."""
    management_address: Address = Address("127.0.0.1", 8081)
    """Where the management API listens. Keep it on a loopback address, or keep token authorization on."""
    metrics_address: Address = Address("127.0.0.1", 8082)
    """Where the metrics API (``GET /metrics``, Prometheus text, no key needed) listens."""
    model_store: Path | None = None
    """The folder of model archives (``.mar``, ``.tar.gz``, ``.tgz``, ``.zip``, ``.model``) and unpacked model
    folders. ``--model-store`` sets it. Registering a model, and ``load_models=all``, need it."""
    load_models: tuple[str, ...] = ()
    """The models to load at start, comma-separated: ``all`` (every archive and model folder of the model store),
    or ``[name=]location`` entries, relative to the model store. ``--models`` sets it. Ignored when a snapshot is
    restored."""
    models: Mapping[str, Mapping[str, Mapping[str, object]]] = field(default_factory=dict)
    """Per-model settings as JSON, in TorchServe's shape: ``{"name": {"version": {"minWorkers": 1, "maxWorkers":
    1, "batchSize": 8, "maxBatchDelay": 50, "responseTimeout": 120, "startupTimeout": 120, "jobQueueSize":
    100}}}``. The model-config YAML and registration parameters take precedence."""
    default_workers_per_model: int = 1
    """Workers of a startup model whose model-config YAML sets no ``minWorkers`` (TorchServe: one per CPU core or
    GPU). When set in config.properties, also the workers of a registration that names no ``initial_workers``;
    unset, such a registration gets none, as in TorchServe."""
    job_queue_size: int = 100
    """Requests each model version may hold waiting for a worker; past that, requests are answered 503 with
    ``Retry-After`` (queue full). ``jobQueueSize`` in a model-config YAML overrides it for that model."""
    default_response_timeout: float = 120.0
    """Seconds a worker may take to answer one batch; then the batch is answered 504 and the worker is killed and
    replaced. Per model: ``responseTimeout`` (model-config YAML) or ``response_timeout`` (registration)."""
    default_startup_timeout: float = 120.0
    """Seconds a worker may take to start and load its model (the handler's ``initialize``) before the load fails.
    Per model: ``startupTimeout`` or ``startup_timeout``."""
    unregister_model_timeout: float = 120.0
    """Seconds an unregistered model keeps working through the requests already queued for it; whatever is left
    then is answered 503."""
    drain_timeout: float = 30.0
    """Seconds that SIGTERM (or SIGINT) leaves requests in flight and queued to finish, before the workers stop
    and the server exits."""
    http_header_timeout: float = 10.0
    """Seconds within which a request's line and headers must arrive, or the connection is closed (slow clients,
    slow loris)."""
    http_body_timeout: float = 60.0
    """Seconds within which a request's body must arrive once its headers have, or the connection is closed."""
    access_log: bool = True
    """Log a line per request, in TorchServe's access-log layout."""
    log_format: str = "text"  # or "json"
    """``text``, or ``json`` for one JSON object per log line."""
    max_request_size: int = 6553500
    """The largest request body, in bytes; a larger one is answered 413 as soon as that is known."""
    max_response_size: int = 6553500
    """The largest answer to one request, in bytes; a larger handler result is answered 500 naming the limit."""
    decode_input_request: bool = True
    """Decode request values for the handler as TorchServe does (``application/json``: the parsed JSON,
    ``text/*``: ``str``, else ``bytearray``); false passes every value as ``bytearray``."""
    service_envelope: str | None = None
    """Wrap every model's handler in one of TorchServe's request envelopes: ``kserve`` (a body's ``instances`` are
    the handler's data, its results answered as ``{"predictions": [...]}``) or ``kservev2`` (the Open Inference
    Protocol's ``inputs`` in, ``outputs`` out). With one, ``/v1/models/{m}:predict`` and ``/v2/models/{m}/infer``
    go through the handler as in TorchServe; without, they are served natively on the model's tensors."""
    number_of_gpu: int | None = None
    """Use at most this many GPUs (default: every NVIDIA GPU visible, narrowed by ``CUDA_VISIBLE_DEVICES``); 0
    runs every model on the CPU."""
    allowed_urls: tuple[str, ...] = ()  # no remote model URLs unless configured (TorchServe allows any)
    """Comma-separated regular expressions; a model URL to register must fully match one. Empty, the default,
    allows no remote URL (TorchServe's default allows any)."""
    token_expiration_min: float = 60.0
    """Minutes the inference and management keys stay valid; ``/token`` rotates a key and restarts its clock."""
    max_download_size: int = 2**30
    """The largest archive, in bytes, that registering a model from a URL downloads."""
    download_timeout: float = 300.0
    """Seconds a model archive download may take."""
    disable_token_authorization: bool = False
    """Serve without keys (``--disable-token-auth``). By default the keys are written to ``key_file.json``."""
    enable_model_api: bool = False
    """Allow registering and unregistering models through the management API (``--enable-model-api``); without it
    those answer 405."""
    snapshots: bool = True
    """Write the registered models to a snapshot after every change and restore them at start; ``--ncs`` turns
    this off. servekit's key (TorchServe has only the flag)."""
    log_location: Path = Path("logs")
    """Where the log of a background start (``servekit.log``) and the snapshots (``config/``) go. Set only by the
    ``LOG_LOCATION`` environment variable, not by a key."""
    raw: Mapping[str, str] = field(default_factory=dict)
    """Every key and value as read, the unused ones included; internal."""


ENVELOPES = ("kserve", "kservev2")  # TorchServe's json and body envelopes are not served
_INT_KEYS = (
    "default_workers_per_model",
    "job_queue_size",
    "max_request_size",
    "max_response_size",
    "max_download_size",
)
_FLOAT_KEYS = (
    "default_response_timeout",
    "default_startup_timeout",
    "unregister_model_timeout",
    "drain_timeout",
    "http_header_timeout",
    "http_body_timeout",
    "download_timeout",
    "token_expiration_min",
)
_BOOL_KEYS = ("decode_input_request", "disable_token_authorization", "enable_model_api", "access_log")
_ENV_KEYS = (
    "inference_address",
    "management_address",
    "metrics_address",
    "model_store",
    "load_models",
    "number_of_gpu",
    "allowed_urls",
    "service_envelope",
    *_INT_KEYS,
    *_FLOAT_KEYS,
    *_BOOL_KEYS,
)


def parse_properties(text: str) -> dict[str, str]:
    """Parse Java ``.properties`` text: ``key=value``/``key: value``/``key value``, ``#``/``!``
    comments, backslash line continuation and the usual escapes."""
    result: dict[str, str] = {}
    logical = ""
    for raw_line in text.splitlines():
        line = raw_line.lstrip()
        if not logical and (not line or line[0] in "#!"):
            continue
        trailing = len(line) - len(line.rstrip("\\"))
        if trailing % 2 == 1:
            logical += line[:-1]
            continue
        logical += line
        key, value = _split_property(logical)
        result[key] = value
        logical = ""
    if logical:
        key, value = _split_property(logical)
        result[key] = value
    return result


def _split_property(line: str) -> tuple[str, str]:
    match = re.match(r"((?:\\.|[^=:\s\\])*)\s*[=:\s]?\s*(.*)$", line, re.DOTALL)
    assert match is not None  # the pattern matches every string
    return _unescape(match.group(1)), _unescape(match.group(2))


def _unescape(value: str) -> str:
    table = {"t": "\t", "n": "\n", "r": "\r", "f": "\f"}

    def replace(match: re.Match[str]) -> str:
        if match.group(1):
            return chr(int(match.group(1), 16))
        return table.get(match.group(2), match.group(2))

    return re.sub(r"\\(?:u([0-9a-fA-F]{4})|(.))", replace, value)


def _as_bool(key: str, value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no", ""):
        return False
    raise ConfigError(f"{key}: expected true or false, got {value!r}")


def _as_number(key: str, value: str, kind: type[int] | type[float]) -> int | float:
    try:
        number = kind(value.strip())
    except ValueError:
        raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if number < 0:
        raise ConfigError(f"{key}: must not be negative, got {value!r}")
    return number


def _expand_env(key: str, value: str, environ: Mapping[str, str]) -> str:
    """Replace ``$$NAME$$`` with the environment variable NAME, as TorchServe does."""

    def lookup(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in environ:
            raise ConfigError(f"{key}: environment variable {name} is not set")
        return environ[name]

    return re.sub(r"\$\$(\w+)\$\$", lookup, value)


def settings_from(values: Mapping[str, str]) -> Settings:
    """Build ``Settings`` from string key/values (the merged file, env and flags)."""
    kwargs: dict[str, object] = {}
    for key in ("inference_address", "management_address", "metrics_address"):
        if values.get(key):
            kwargs[key] = Address.parse(key, values[key])
    if values.get("model_store"):
        kwargs["model_store"] = Path(values["model_store"]).expanduser().resolve()
    if values.get("load_models"):
        kwargs["load_models"] = tuple(m.strip() for m in values["load_models"].split(",") if m.strip())
    if values.get("models"):
        try:
            models = json.loads(values["models"])
        except json.JSONDecodeError as exc:
            raise ConfigError(f"models: not valid JSON ({exc})") from None
        if not isinstance(models, dict) or not all(isinstance(v, dict) for v in models.values()):
            raise ConfigError('models: expected {"name": {"version": {...}}}')
        kwargs["models"] = models
    for key in _INT_KEYS:
        if values.get(key):
            kwargs[key] = _as_number(key, values[key], int)
    for key in _FLOAT_KEYS:
        if values.get(key):
            kwargs[key] = _as_number(key, values[key], float)
    for key in _BOOL_KEYS:
        if key in values:
            kwargs[key] = _as_bool(key, values[key])
    if values.get("number_of_gpu"):
        kwargs["number_of_gpu"] = _as_number("number_of_gpu", values["number_of_gpu"], int)
    if values.get("allowed_urls"):
        patterns = tuple(p.strip() for p in values["allowed_urls"].split(",") if p.strip())
        for pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ConfigError(f"allowed_urls: bad pattern {pattern!r} ({exc})") from None
        kwargs["allowed_urls"] = patterns
    if values.get("log_format"):
        if values["log_format"] not in ("text", "json"):
            raise ConfigError(f"log_format: expected text or json, got {values['log_format']!r}")
        kwargs["log_format"] = values["log_format"]
    if values.get("service_envelope"):
        if values["service_envelope"] not in ENVELOPES:
            raise ConfigError(
                f"service_envelope: expected one of {', '.join(ENVELOPES)}, got {values['service_envelope']!r}"
            )
        kwargs["service_envelope"] = values["service_envelope"]
    if "snapshots" in values:
        kwargs["snapshots"] = _as_bool("snapshots", values["snapshots"])
    return Settings(raw=dict(values), **kwargs)  # type: ignore[arg-type]


def load_settings(
    config_file: str | os.PathLike[str] | None = None,
    flags: Mapping[str, str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Read the config file (``--ts-config``, else ``TS_CONFIG_FILE``, else ``./config.properties``
    if present), then ``TS_*`` variables if ``enable_envvars_config`` is true, then ``flags``."""
    environ = os.environ if environ is None else environ
    path = config_file or environ.get("TS_CONFIG_FILE")
    values: dict[str, str] = {}
    if path is not None:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
        values = parse_properties(text)
    elif Path("config.properties").is_file():
        values = parse_properties(Path("config.properties").read_text())
    values = {key: _expand_env(key, value, environ) for key, value in values.items()}
    if _as_bool("enable_envvars_config", values.get("enable_envvars_config", "false")):
        for key in _ENV_KEYS:
            env_name = f"TS_{key.upper()}"
            if env_name in environ:
                values[key] = environ[env_name]
    values.update(flags or {})
    settings = settings_from(values)
    if environ.get("LOG_LOCATION"):
        settings = replace(settings, log_location=Path(environ["LOG_LOCATION"]))
    return settings


def detect_gpu_count(settings: Settings, environ: Mapping[str, str] | None = None) -> int:
    """GPUs the workers may use, without importing torch in the front end: the NVIDIA device files,
    narrowed by ``CUDA_VISIBLE_DEVICES`` and capped by ``number_of_gpu``."""
    environ = os.environ if environ is None else environ
    found = len([p for p in Path("/dev").glob("nvidia[0-9]*")])
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        found = min(found, len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"]))
    if settings.number_of_gpu is not None:
        found = min(found, settings.number_of_gpu)
    return found
