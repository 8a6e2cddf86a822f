"""TLS for the ports whose address is ``https://``: the server's key and certificate chain from TorchServe's keys, and
the ``ssl.SSLContext`` the ports serve with.

Where the key comes from, as in TorchServe: the first key entry of ``keystore`` (PKCS12, opened with
``keystore_pass``), else ``private_key_file`` with ``certificate_file`` (PEM). ``client_ca_file`` (servekit's key)
turns on mutual TLS: a client must present a certificate signed by one of its authorities. Everything is read and
checked once, at start; a file that cannot be read, a wrong password, a Java JKS keystore, or a key that is not the
certificate's is a ``ConfigError`` naming the key (TorchServe fails with a Java stack trace, or, given no key at all,
serves a certificate it generates: servekit refuses to start instead).

TLS 1.2 and 1.3 with Python's default ciphers (TorchServe: TLS 1.2 and two ciphers), ALPN ``http/1.1``. PEM files
are checked with the standard library's ``ssl``; ``cryptography`` opens a PKCS12 keystore, and is imported only then
(it costs the front end about 13 MB). Keys reach OpenSSL through anonymous in-memory files, so a keystore's key is
never written to disk.
"""

from __future__ import annotations

import contextlib
import os
import re
import ssl
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from servekit.errors import ConfigError
from servekit.settings import Settings

ADDRESS_KEYS = ("inference_address", "management_address", "metrics_address")
JAVA_KEYSTORES = {b"\xfe\xed\xfe\xed": "JKS", b"\xce\xce\xce\xce": "JCEKS"}  # their files' magic numbers
PEM_KEY = re.compile(rb"-----BEGIN [A-Z ]*PRIVATE KEY-----")


@dataclass(frozen=True, slots=True)
class ServerIdentity:
    """The server's private key and certificate chain (server certificate first), PEM, for any listener that serves
    TLS (the gRPC ports too)."""

    key_pem: bytes
    chain_pem: bytes


def https_keys(settings: Settings) -> list[str]:
    """The address keys whose address is ``https://``."""
    return [key for key in ADDRESS_KEYS if getattr(settings, key).scheme == "https"]


def server_context(settings: Settings) -> ssl.SSLContext | None:
    """The context every ``https://`` port serves with; ``None`` when no address is ``https://``. Raises
    ``ConfigError`` naming the key at fault."""
    keys = https_keys(settings)
    if not keys:
        return None
    identity = load_identity(settings, keys[0])
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)  # TLS 1.2 at the least
    context.set_alpn_protocols(["http/1.1"])
    _load(context, identity)
    if settings.client_ca_file is not None:
        try:
            context.load_verify_locations(cafile=settings.client_ca_file)
        except ssl.SSLError:  # before OSError, its base
            raise ConfigError(f"client_ca_file: {settings.client_ca_file} holds no PEM certificate") from None
        except OSError as exc:
            raise ConfigError(f"client_ca_file: cannot read {settings.client_ca_file}: {exc.strerror}") from None
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def load_identity(settings: Settings, needed_by: str) -> ServerIdentity:
    """The key and chain of ``keystore``, else of ``private_key_file`` + ``certificate_file``, checked: OpenSSL
    takes them and the key is the certificate's. ``needed_by`` (the key that asks for TLS) is named when neither is
    set."""
    if settings.keystore is not None:
        return _open_keystore(settings.keystore, settings.keystore_pass, settings.keystore_type)
    if settings.private_key_file is not None and settings.certificate_file is not None:
        return _open_pem(settings.private_key_file, settings.certificate_file)
    if settings.private_key_file is None and settings.certificate_file is None:
        raise ConfigError(
            f"{needed_by}: https:// needs the server's key and certificate: set keystore (PKCS12), or "
            "private_key_file and certificate_file (PEM)"
        )
    given, missing = ("private_key_file", "certificate_file")
    if settings.private_key_file is None:
        given, missing = missing, given
    raise ConfigError(f"{missing}: not set, and {given} needs it for {needed_by}=https://...")


def _read(key: str, path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read {path}: {exc.strerror}") from None


def _open_pem(key_file: Path, certificate_file: Path) -> ServerIdentity:
    """The PEM files as they are, once OpenSSL has taken them (with the standard library only)."""
    identity = ServerIdentity(_read("private_key_file", key_file), _read("certificate_file", certificate_file))
    if not PEM_KEY.search(identity.key_pem):
        raise ConfigError(f"private_key_file: {key_file} holds no PEM private key")
    if b"-----BEGIN ENCRYPTED PRIVATE KEY-----" in identity.key_pem or b"Proc-Type: 4,ENCRYPTED" in identity.key_pem:
        raise ConfigError(
            f"private_key_file: {key_file} is encrypted; servekit reads unencrypted keys, as TorchServe does "
            f"(decrypt it with: openssl pkey -in {key_file} -out key.pem)"
        )
    if b"-----BEGIN CERTIFICATE-----" not in identity.chain_pem:
        raise ConfigError(f"certificate_file: {certificate_file} holds no PEM certificate")
    try:
        _load(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), identity)
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise ConfigError(
                f"private_key_file: the key of {key_file} is not the key of certificate_file's certificate "
                f"({certificate_file})"
            ) from None
        raise ConfigError(
            f"private_key_file, certificate_file: OpenSSL cannot use {key_file} with {certificate_file} ({exc})"
        ) from None
    return identity


def _open_keystore(path: Path, password: str, kind: str) -> ServerIdentity:
    """The first key entry of a PKCS12 keystore, as PEM (``cryptography``, imported only here)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.serialization import pkcs12

    if kind.upper() not in ("PKCS12", "JKS"):
        raise ConfigError(f"keystore_type: servekit reads PKCS12 keystores, got {kind!r}")
    data = _read("keystore", path)
    if data[:4] in JAVA_KEYSTORES:
        converted = path.with_suffix(".p12")
        if converted.exists():
            converted = path.with_name(f"{path.stem}-pkcs12.p12")
        raise ConfigError(
            f"keystore: {path} is a Java {JAVA_KEYSTORES[data[:4]]} keystore; servekit reads PKCS12 keystores. "
            f"Convert it with: keytool -importkeystore -srckeystore {path} -destkeystore {converted} "
            f"-deststoretype PKCS12 (keytool asks for the passwords), then set keystore={converted}"
        )
    try:
        key, cert, more = pkcs12.load_key_and_certificates(data, password.encode() if password else None)
    except ValueError:
        raise ConfigError(
            f"keystore: cannot open {path} with keystore_pass: a wrong password, or not a PKCS12 keystore"
        ) from None
    if key is None or cert is None:
        raise ConfigError(f"keystore: {path} holds no key entry (a private key with its certificate)")
    pem = serialization.Encoding.PEM
    identity = ServerIdentity(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
        b"".join(c.public_bytes(pem) for c in [cert, *more]),
    )
    try:
        _load(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), identity)
    except ssl.SSLError as exc:
        raise ConfigError(f"keystore: OpenSSL cannot use the key entry of {path} ({exc})") from None
    return identity


def _load(context: ssl.SSLContext, identity: ServerIdentity) -> None:
    """``context.load_cert_chain`` from memory; a key that wants a password fails instead of prompting for one."""

    def no_password() -> bytes:
        raise ssl.SSLError("the key is encrypted")

    with _in_memory(identity.chain_pem) as chain, _in_memory(identity.key_pem) as key:
        context.load_cert_chain(chain, key, password=no_password)


@contextlib.contextmanager
def _in_memory(data: bytes) -> Iterator[str]:
    """A path OpenSSL can open that holds ``data``: an anonymous in-memory file (Linux), else a private temporary
    file removed at once."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("servekit-tls", os.MFD_CLOEXEC)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            yield f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)
        return
    with tempfile.TemporaryDirectory() as folder:  # mode 0700
        path = Path(folder) / "identity.pem"
        path.touch(0o600)
        path.write_bytes(data)
        yield str(path)
