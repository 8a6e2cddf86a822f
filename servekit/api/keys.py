"""Keys that the operator supplies for token authorization, so that every replica given them accepts the same keys:
a JSON file in the shape of TorchServe's ``key_file.json`` (``key_file``, e.g. a mounted Kubernetes Secret), or the
environment variables ``SERVEKIT_INFERENCE_KEY``, ``SERVEKIT_MANAGEMENT_KEY`` and ``SERVEKIT_API_KEY``.

Read once, at start. Key material that is missing, unreadable or malformed is a ``ConfigError`` that names the source
and the rule broken, never a key: the start stops (exit code 1) rather than serve with no keys or with keys nobody
knows. Supplied keys need ``inference`` and ``management`` (the ``API`` key is optional: rotation is refused when the
keys are supplied), each of at least ``MIN_KEY_LENGTH`` visible ASCII characters, all different. An ``expiration
time`` of a file's entry is kept (the key is refused after it); one already past stops the start.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from servekit.config import KEY_VARIABLES
from servekit.errors import ConfigError
from servekit.settings import Settings

logger = logging.getLogger("servekit.auth")

KINDS = ("inference", "management")
MIN_KEY_LENGTH = 22  # 128 bits of url-safe base64
KEY_CHARACTERS = re.compile(r"[\x21-\x7e]+")  # what `Authorization: Bearer <key>` carries: visible ASCII, no space
MAKE_KEY = "python3 -c 'import secrets; print(secrets.token_urlsafe(32))'"


@dataclass(frozen=True, slots=True)
class SuppliedKeys:
    """The keys by kind (``inference``, ``management``, and ``API`` when given), the time after which a key is refused
    (seconds since the epoch; kinds without one never expire), and where they came from, for messages."""

    source: str
    keys: Mapping[str, str] = field(repr=False)
    expiry: Mapping[str, float]


def supplied_keys(settings: Settings) -> SuppliedKeys | None:
    """The keys of ``key_file`` or of the ``SERVEKIT_<KIND>_KEY`` variables, checked; None when neither is given."""
    if settings.key_file is None and not settings.supplied_keys:
        return None
    variables = ", ".join(KEY_VARIABLES[kind] for kind in settings.supplied_keys)
    source = "key_file" if settings.key_file is not None else variables
    if settings.disable_token_authorization:
        raise ConfigError(
            f"disable_token_authorization (--disable-token-auth) and keys supplied by {source} contradict each other: "
            "remove one"
        )
    if settings.key_file is not None and settings.supplied_keys:
        raise ConfigError(f"key_file and the environment variables {variables} both supply keys: use one of them")
    if settings.key_file is not None:
        found = read_key_file(settings.key_file)
    else:
        found = _from_environment(settings.supplied_keys)
    _check_distinct(found)
    return found


def read_key_file(path: Path) -> SuppliedKeys:
    """The keys of a ``key_file.json``; ``ConfigError`` naming what is wrong with it (never a key) otherwise."""
    where = f"key_file {path}"
    try:
        text = path.read_text(encoding="utf-8")
        mode = path.stat().st_mode
    except OSError as exc:
        raise ConfigError(f"key_file: cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{where} is not UTF-8 text") from None
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:  # its message holds no text of the file
        raise ConfigError(f"{where} is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}") from None
    if not isinstance(document, dict):
        raise ConfigError(f'{where}: expected an object {{"inference": {{"key": ...}}, "management": {{...}}}}')
    if set(document) - {*KINDS, "API"}:  # the names are not shown: a key pasted in the wrong place would be
        raise ConfigError(f"{where}: holds entries other than inference, management and API (names are case-sensitive)")
    keys: dict[str, str] = {}
    expiry: dict[str, float] = {}
    for kind in (*KINDS, "API"):
        if kind not in document:
            if kind == "API":
                continue
            raise ConfigError(f'{where}: no {kind} entry ({{"{kind}": {{"key": "..."}}}})')
        entry = document[kind]
        fields = {"key"} if kind == "API" else {"key", "expiration time"}
        if not isinstance(entry, dict) or "key" not in entry or set(entry) - fields:
            allowed = "key" if kind == "API" else 'key and optionally "expiration time"'
            raise ConfigError(f"{where}: the {kind} entry must be an object with {allowed}")
        keys[kind] = _checked_key(entry["key"], f"{where}: the {kind} key")
        if "expiration time" in entry:
            expiry[kind] = _expiry(entry["expiration time"], f"{where}: the {kind} key's expiration time")
    if mode & 0o004:
        logger.warning("key_file %s can be read by every user of this machine: make it mode 0600 (or 0440)", path)
    return SuppliedKeys(f"key_file {path}", keys, expiry)


def _from_environment(values: Mapping[str, str]) -> SuppliedKeys:
    missing = [KEY_VARIABLES[kind] for kind in KINDS if kind not in values]
    if missing:
        given = ", ".join(KEY_VARIABLES[kind] for kind in values)
        raise ConfigError(f"{given} set but not {', '.join(missing)}: supplied keys need inference and management keys")
    keys = {kind: _checked_key(value, KEY_VARIABLES[kind]) for kind, value in values.items()}
    return SuppliedKeys("environment variables " + ", ".join(KEY_VARIABLES[kind] for kind in keys), keys, {})


def _checked_key(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{what} is not a string")
    if not value:
        raise ConfigError(f"{what} is empty")
    if not KEY_CHARACTERS.fullmatch(value):
        raise ConfigError(f"{what} holds a character other than visible ASCII (a space or a line break?)")
    if len(value) < MIN_KEY_LENGTH:
        raise ConfigError(
            f"{what} is {len(value)} characters long; a key needs at least {MIN_KEY_LENGTH} (128 random bits): "
            f"make one with {MAKE_KEY}"
        )
    return value


def _expiry(value: object, what: str) -> float:
    """``value``, an ISO-8601 instant (``2026-01-01T13:00:00.000000Z``, as servekit and TorchServe write it), in
    seconds since the epoch; it must still be ahead. The text is never shown (a key pasted there would be)."""
    if not isinstance(value, str):
        raise ConfigError(f"{what} is not a string")
    text = re.sub(r"(\.\d{6})\d+", r"\1", value.strip())  # Java's Instant writes nanoseconds; Python reads micro
    try:
        instant = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise ConfigError(f"{what} is not an ISO-8601 time such as 2026-01-01T13:00:00Z") from None
    if instant.tzinfo is None:
        raise ConfigError(f"{what} has no time zone (end it with Z for UTC)")
    if instant.timestamp() <= time.time():
        raise ConfigError(f"{what}, {_iso(instant)}, has passed: supply a new key, or remove the expiration time")
    return instant.timestamp()


def _iso(instant: datetime) -> str:
    return instant.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _check_distinct(found: SuppliedKeys) -> None:
    kinds = list(found.keys)
    for i, kind in enumerate(kinds):
        for other in kinds[i + 1 :]:
            if found.keys[kind] == found.keys[other]:
                raise ConfigError(f"{found.source}: the {kind} and {other} keys are the same; each kind needs its own")
