"""Sequence batching's settings (model-config ``sequenceBatching: true``, TorchServe 0.12's stateful inference), apart
from the batcher that applies them (``servekit.sequence_batcher``): the header names that carry a request's sequence
and how they are read and written (``SequenceKeys``), and a model config's limits and clocks (``SequencePolicy``).

The handler sees a sequence's headers under the names config.properties gives (``ts_header_key_sequence_*``, lower
case, as the HTTP layer passes names) and also under TorchServe's default names, which its context reads. Runs in the
front-end process; never imports asyncio.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from servekit.errors import BadRequestError
from servekit.protocol import Request

DEFAULT_ID = "ts_request_sequence_id"  # TorchServe's header names, which its handlers read through the context
DEFAULT_START = "ts_request_sequence_start"
DEFAULT_END = "ts_request_sequence_end"


@dataclass(frozen=True, slots=True)
class SequenceKeys:
    """The header names of sequence batching (config.properties ``ts_header_key_sequence_*``)."""

    id: str = DEFAULT_ID
    start: str = DEFAULT_START
    end: str = DEFAULT_END

    def sequence_id(self, headers: Mapping[str, str]) -> str | None:
        """The sequence id a request (or an answer) names, if any."""
        return _header(headers, self.id)

    def ends(self, headers: Mapping[str, str]) -> bool:
        """Whether a request is its sequence's last: its end header is ``true`` (any case)."""
        return (_header(headers, self.end) or "").strip().lower() == "true"

    def ended_by(self, headers: Mapping[str, str]) -> set[str] | None:
        """The sequence ids a handler's answer closes in its end header (ids separated by ``;``, TorchServe's
        contract), under this name or TorchServe's; ``None`` when the answer has no end header."""
        value = _header(headers, self.end) or _header(headers, DEFAULT_END)
        return None if value is None else {name.strip() for name in value.split(";")}

    def for_handler(self, request: Request, sequence_id: str, start: bool, end: bool) -> Request:
        """``request`` with the headers its handler sees: the sequence id, and ``true`` under the start header on a
        sequence's first request and under the end header on its last, each replacing the request's own."""
        headers = _named(self.start, "true", DEFAULT_START) if start else {}
        if end:
            headers |= _named(self.end, "true", DEFAULT_END)
        headers |= _named(self.id, sequence_id, DEFAULT_ID)
        kept = {name: value for name, value in request.headers.items() if name.lower() not in headers}
        return replace(request, headers=kept | headers)


DEFAULT_KEYS = SequenceKeys()


@dataclass(frozen=True, slots=True)
class SequencePolicy:
    """A model's sequence settings, from its model-config YAML; times in ``time.monotonic`` seconds."""

    max_idle_ms: int = 0
    timeout_ms: int = 0
    max_queue: int = 1
    max_sequences: int = 1
    keys: SequenceKeys = field(default_factory=SequenceKeys)

    def outlived(self, started: float, now: float, slack: float = 0.0) -> bool:
        """Whether a sequence that started at ``started`` has reached ``sequenceTimeoutMSec`` at ``now`` (within
        ``slack`` seconds); never when that is 0."""
        return bool(self.timeout_ms) and now >= started + self.timeout_ms / 1000 - slack

    def deadline(self, started: float, last: float) -> float:
        """When a sequence with nothing waiting or running expires: ``sequenceMaxIdleMSec`` after ``last`` (its last
        answer, or its start) or ``sequenceTimeoutMSec`` after ``started``, the earlier; ``math.inf`` for never."""
        deadline = math.inf
        if self.max_idle_ms:
            deadline = last + self.max_idle_ms / 1000
        if self.timeout_ms:
            deadline = min(deadline, started + self.timeout_ms / 1000)
        return deadline

    def expiry_reason(self, lifetime: bool) -> str:
        """Why an expired sequence's id is answered 404: its lifetime, else its idle time, ran out."""
        if lifetime:
            return f"expired: sequenceTimeoutMSec={self.timeout_ms} ms have passed since it started"
        return f"expired: no request for sequenceMaxIdleMSec={self.max_idle_ms} ms"


def sequence_batching(model_yaml_config: Mapping[str, Any]) -> bool:
    """Whether the model config says ``sequenceBatching: true`` (a YAML boolean, as TorchServe reads it)."""
    return model_yaml_config.get("sequenceBatching") is True


def sequence_policy(config: Mapping[str, Any], keys: SequenceKeys = DEFAULT_KEYS) -> SequencePolicy:
    """The policy of a model config; ``BadRequestError`` for a value that is not an integer in range."""

    def number(key: str, default: int, minimum: int) -> int:
        value = config.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise BadRequestError(f"model config: {key} must be an integer of at least {minimum}, got {value!r}")
        return value

    return SequencePolicy(
        max_idle_ms=number("sequenceMaxIdleMSec", 0, 0),
        timeout_ms=number("sequenceTimeoutMSec", 0, 0),
        max_queue=number("maxSequenceJobQueueSize", 1, 1),
        max_sequences=number("maxNumSequence", 1, 1),
        keys=keys,
    )


def _header(headers: Mapping[str, str], name: str) -> str | None:
    """A header by name in any case (the HTTP layer passes lower-case names; a handler sets its own)."""
    value = headers.get(name)
    if value is None:
        lowered = name.lower()
        value = next((v for k, v in headers.items() if k.lower() == lowered), None)
    return value


def _named(key: str, value: str, default: str) -> dict[str, str]:
    """``value`` under ``key`` (lower case, as the HTTP layer passes names), and under TorchServe's default name,
    which the handler's context reads, when ``key`` is another."""
    return {key.lower(): value, default: value}
