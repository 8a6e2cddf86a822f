"""Token authorization, compatible with TorchServe's (``key_file.json``, ``Authorization: Bearer <key>``) but with
strong keys: 256-bit random, compared in constant time, the key file created with mode 0600.

Three keys: ``inference`` (the inference API), ``management`` (the management API), and ``API`` (only for
``/token?type=...``, which rotates one of the other two). Inference and management keys expire after
``token_expiration_min``. A missing, wrong or expired key is 401 with ``WWW-Authenticate``; a valid key of the
other kind is 403. ``/ping`` needs no key (load balancers and Kubernetes probe it), nor does the metrics API.

Keys the operator supplies (``servekit.api.keys``: ``key_file`` or ``SERVEKIT_<KIND>_KEY``) replace the made ones,
so that replicas share them: then nothing is written or removed, a key expires only at its own ``expiration time``,
and ``/token`` is refused (405), since rotating on one replica would split the fleet. No key is ever logged.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import secrets
import time
from datetime import UTC, datetime
from pathlib import Path

from starlette.types import ASGIApp, Receive, Scope, Send

from servekit.api.errors import error_response
from servekit.api.keys import SuppliedKeys
from servekit.errors import (
    BadRequestError,
    ConfigError,
    ForbiddenError,
    MethodNotAllowedError,
    ServekitError,
    UnauthorizedError,
)

logger = logging.getLogger("servekit.auth")

KINDS = ("inference", "management")
FAILED = "Token Authorization failed. Token either incorrect, expired, or not provided correctly"
ROTATION_OFF = (
    "Token rotation is off: the keys are supplied by the operator (key_file or SERVEKIT_*_KEY variables), the same on "
    "every replica; change them there and restart the replicas"
)


class TokenStore:
    """The server's keys: made at start and published in the key file at ``path`` (a ``ConfigError`` naming it when
    it cannot be written), or, with ``supplied``, the operator's (``path`` is then neither written nor removed)."""

    def __init__(self, path: Path, expiration_min: float, supplied: SuppliedKeys | None = None) -> None:
        self.path = path
        self.lifetime_s = expiration_min * 60
        self.supplied = supplied
        if supplied is not None:
            self._keys = dict(supplied.keys)
            self._expiry = dict(supplied.expiry)
            logger.info("token authorization: keys supplied by %s", supplied.source)
            return
        self._keys = {kind: secrets.token_urlsafe(32) for kind in (*KINDS, "API")}
        self._expiry = {kind: time.time() + self.lifetime_s for kind in KINDS}
        try:
            self._write()
        except OSError as exc:  # a read-only working directory (docs/deploy.md): one line, not a traceback
            raise ConfigError(
                f"cannot write the token keys to {self.path.absolute()} ({exc.strerror or exc}): start servekit in a "
                "writable working directory, supply the keys (key_file, or SERVEKIT_INFERENCE_KEY and "
                "SERVEKIT_MANAGEMENT_KEY), or turn token authorization off (--disable-token-auth)"
            ) from None

    def _write(self) -> None:
        document = {kind: {"key": self._keys[kind], "expiration time": _iso(self._expiry[kind])} for kind in KINDS}
        document["API"] = {"key": self._keys["API"]}
        self.path.unlink(missing_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump(document, handle, indent=2)

    def _matches(self, kind: str, key: str) -> bool:
        return kind in self._keys and hmac.compare_digest(self._keys[kind].encode(), key.encode())

    def check(self, kind: str, authorization: str | None) -> None:
        """Raise ``UnauthorizedError``/``ForbiddenError`` unless ``authorization`` carries a valid ``kind`` key."""
        key = _bearer(authorization)
        if key is not None and self._matches(kind, key):
            if kind in self._expiry and time.time() > self._expiry[kind]:
                raise UnauthorizedError(FAILED)
            return
        others = [k for k in (*KINDS, "API") if k != kind]
        if key is not None and any(self._matches(k, key) for k in others):
            raise ForbiddenError(
                f"This key is not valid for the {kind} API" if kind in KINDS else "This is not the API key"
            )
        raise UnauthorizedError(FAILED)

    def rotate(self, kind: str, authorization: str | None) -> None:
        """Give ``kind`` a new key and expiry (needs the API key), and rewrite the key file. Refused (405) when the
        keys are supplied: a new key on one replica would leave the others on the old one."""
        if self.supplied is not None:
            raise MethodNotAllowedError(ROTATION_OFF)
        if kind not in KINDS:
            raise BadRequestError("Parameter type must be management or inference")
        self.check("API", authorization)
        self._keys[kind] = secrets.token_urlsafe(32)
        self._expiry[kind] = time.time() + self.lifetime_s
        self._write()

    def remove(self) -> None:
        """Remove the key file the server wrote; supplied keys' files are the operator's and stay."""
        if self.supplied is None:
            self.path.unlink(missing_ok=True)


def _bearer(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, key = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return key.strip() or None


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat().replace("+00:00", "Z")


class TokenAuth:
    """ASGI middleware: every HTTP request needs a valid ``kind`` key, except the ``open_paths``."""

    def __init__(self, app: ASGIApp, store: TokenStore, kind: str, open_paths: tuple[str, ...]) -> None:
        self.app = app
        self.store = store
        self.kind = kind
        self.open_paths = open_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in self.open_paths:
            authorization = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"authorization"), None)
            try:
                self.store.check(self.kind, authorization)
            except ServekitError as exc:
                response = error_response(exc.status_code, exc.type_name, exc.message, exc.headers)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
