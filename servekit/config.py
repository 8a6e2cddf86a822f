"""Server settings: config.properties, then the environment, then command-line flags.

This is the only module that reads the environment or a config file for the server. Everything is
parsed once, at start, into the frozen ``Settings`` (``servekit.settings``); a value that cannot be parsed is a
``ConfigError`` naming the key, never a silent default.

Keys and defaults follow TorchServe 0.12's ``config.properties`` (``../shared/reference/torchserve.md`` §6).
Environment variables ``TS_<KEY>`` are read only when ``enable_envvars_config=true``, as in TorchServe.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

from servekit.errors import ConfigError
from servekit.settings import Address, Settings

ENVELOPES = ("kserve", "kservev2")  # TorchServe's json and body envelopes are not served
_INT_KEYS = (
    "default_workers_per_model",
    "job_queue_size",
    "max_request_size",
    "max_response_size",
    "max_download_size",
    "grpc_inference_max_connection_age_ms",
    "grpc_inference_max_connection_age_grace_ms",
    "grpc_management_max_connection_age_ms",
    "grpc_management_max_connection_age_grace_ms",
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
_BOOL_KEYS = ("decode_input_request", "disable_token_authorization", "enable_model_api", "access_log", "fork_workers")
_GRPC_KEYS = ("grpc_inference_address", "grpc_inference_port", "grpc_management_address", "grpc_management_port")
_TLS_PATH_KEYS = ("private_key_file", "certificate_file", "keystore", "client_ca_file")
_CORS_KEYS = ("cors_allowed_origin", "cors_allowed_methods", "cors_allowed_headers")
_SEQUENCE_KEYS = ("ts_header_key_sequence_id", "ts_header_key_sequence_start", "ts_header_key_sequence_end")
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # an HTTP header name (RFC 9110)
# the environment variables that supply token authorization's keys (``servekit.api.keys``), by kind; always read
KEY_VARIABLES = {
    "inference": "SERVEKIT_INFERENCE_KEY",
    "management": "SERVEKIT_MANAGEMENT_KEY",
    "API": "SERVEKIT_API_KEY",
}
_ENV_KEYS = (
    "inference_address",
    "management_address",
    "metrics_address",
    *_GRPC_KEYS,
    "enable_grpc",
    "enable_grpc_ssl",
    *_TLS_PATH_KEYS,
    "keystore_pass",
    "keystore_type",
    *_CORS_KEYS,
    *_SEQUENCE_KEYS,
    "model_store",
    "load_models",
    "number_of_gpu",
    "allowed_urls",
    "key_file",
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


def _host(key: str, value: str) -> str:
    """A host name or IP address to listen on (``[...]`` around an IPv6 address is dropped)."""
    host = value.strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host or "/" in host or any(c.isspace() for c in host) or (host.count(":") == 1):
        raise ConfigError(f"{key}: expected a host name or IP address (no scheme, no port), got {value!r}")
    return host


def _port(key: str, value: str) -> int:
    port = _as_number(key, value, int)
    if not 0 < port < 65536:
        raise ConfigError(f"{key}: expected a port from 1 to 65535, got {value!r}")
    return int(port)


def _header_value(key: str, value: str) -> str:
    """``value`` as an HTTP header value: Latin-1 text without control characters (no header injection)."""
    value = value.strip()
    if any((ord(c) < 32 and c != "\t") or ord(c) == 127 or ord(c) > 255 for c in value):
        raise ConfigError(f"{key}: not a valid HTTP header value: {value!r}")
    return value


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
    if "key_file" in values:  # an empty value is a mistake (an unset $$VARIABLE$$?), not "no supplied keys"
        if not values["key_file"].strip():
            raise ConfigError("key_file: empty; name the file of the keys, or leave the key out")
        kwargs["key_file"] = Path(values["key_file"].strip()).expanduser().resolve()
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
    for key in _GRPC_KEYS:
        if values.get(key):
            kwargs[key] = _port(key, values[key]) if key.endswith("_port") else _host(key, values[key])
    for key in ("enable_grpc", "enable_grpc_ssl"):
        if key in values:
            kwargs[key] = _as_bool(key, values[key])
    if "snapshots" in values:
        kwargs["snapshots"] = _as_bool("snapshots", values["snapshots"])
    for key in _TLS_PATH_KEYS:  # read and checked at start, and only for an https:// address (servekit.tls)
        if values.get(key):
            kwargs[key] = Path(values[key]).expanduser().resolve()
    if "keystore_pass" in values:
        kwargs["keystore_pass"] = values["keystore_pass"]
    if values.get("keystore_type"):
        kwargs["keystore_type"] = values["keystore_type"].strip()
    for key in _CORS_KEYS:
        if values.get(key):
            kwargs[key] = _header_value(key, values[key])
    for key in _SEQUENCE_KEYS:
        if values.get(key):
            name = values[key].strip()
            if not _TOKEN.fullmatch(name):
                raise ConfigError(f"{key}: not a valid HTTP header name: {values[key]!r}")
            kwargs[key] = name
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
    if environ.get("SERVEKIT_TEST_HOSTS"):
        settings = replace(settings, test_hosts=Path(environ["SERVEKIT_TEST_HOSTS"]))
    supplied = {kind: environ[name] for kind, name in KEY_VARIABLES.items() if name in environ}
    if supplied:  # checked, with the key file, by servekit.api.keys at start
        settings = replace(settings, supplied_keys=supplied)
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
