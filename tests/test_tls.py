"""HTTPS with TorchServe's keys (``servekit.tls``): a PEM key and certificate, a PKCS12 keystore, mutual TLS
(``client_ca_file``), ``/predictions`` over TLS on the inference fast path, ``servekit start`` in the background over
HTTPS, and the start-up errors that name the key at fault. Every key and certificate is generated here."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import os
import ssl
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
import uvloop
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import NameOID
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from servekit.api.http import protocol_with
from servekit.config import load_settings, settings_from
from servekit.errors import ConfigError
from servekit.settings import Address
from servekit.tls import server_context
from tests.helpers import Server, free_port, make_archive, running_server, write_config

SERVEKIT = str(Path(sys.executable).with_name("servekit"))
KEYSTORE_PASS = "s3cret"
ECHO = """
def handle(data, context):
    if data is None:
        return None
    return [row.get("data") or row.get("body") for row in data]
"""

Key = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _certificate(name: str, key: Key, issuer: x509.Certificate | None, issuer_key: Key) -> x509.Certificate:
    """A certificate for ``key``, signed by ``issuer`` (``None``: a self-signed authority); leaves name 127.0.0.1."""
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(issuer.subject if issuer is not None else _name(name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False)
    )
    if issuer is None:
        usage = dict.fromkeys(
            ("digital_signature", "content_commitment", "key_encipherment", "data_encipherment", "key_agreement"),
            False,
        )
        usage |= {"key_cert_sign": True, "crl_sign": True, "encipher_only": False, "decipher_only": False}
        builder = builder.add_extension(x509.KeyUsage(**usage), critical=True)
    else:
        addresses = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        builder = builder.add_extension(x509.SubjectAlternativeName(addresses), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _pem(*items: x509.Certificate | Key, traditional: bool = False, password: bytes | None = None) -> bytes:
    out = b""
    for item in items:
        if isinstance(item, x509.Certificate):
            out += item.public_bytes(serialization.Encoding.PEM)
        else:
            fmt = serialization.PrivateFormat.TraditionalOpenSSL if traditional else serialization.PrivateFormat.PKCS8
            encryption: serialization.KeySerializationEncryption = (
                serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption()
            )
            out += item.private_bytes(serialization.Encoding.PEM, fmt, encryption)
    return out


@dataclass(frozen=True)
class Pki:
    """Files of a small PKI: a server authority and a server certificate for 127.0.0.1, a client authority and a
    client certificate, and the wrong things a configuration can name."""

    folder: Path

    def __getattr__(self, name: str) -> Path:
        return self.folder / f"{name}.pem"

    def client(self, certificate: str | None = None) -> ssl.SSLContext:
        """A client that trusts the server authority, presenting ``certificate`` (``client``, ``stranger``)."""
        context = ssl.create_default_context(cafile=self.folder / "ca.pem")
        if certificate is not None:
            context.load_cert_chain(self.folder / f"{certificate}.pem", self.folder / f"{certificate}_key.pem")
        return context


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca_key, client_ca_key, stranger_ca_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    ca = _certificate("servekit test CA", ca_key, None, ca_key)
    client_ca = _certificate("servekit test client CA", client_ca_key, None, client_ca_key)
    stranger_ca = _certificate("someone else's CA", stranger_ca_key, None, stranger_ca_key)
    key, other_key, client_key, stranger_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(4))
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    cert = _certificate("127.0.0.1", key, ca, ca_key)
    files = {
        "ca": _pem(ca),
        "key": _pem(key),
        "cert": _pem(cert, ca),  # the chain: server certificate first
        "rsa_key": _pem(rsa_key, traditional=True),  # BEGIN RSA PRIVATE KEY, as older openssl writes
        "rsa_cert": _pem(_certificate("127.0.0.1", rsa_key, ca, ca_key)),
        "other_key": _pem(other_key),
        "encrypted_key": _pem(key, password=b"pass"),
        "client_ca": _pem(client_ca),
        "client": _pem(_certificate("a client", client_key, client_ca, client_ca_key)),
        "client_key": _pem(client_key),
        "stranger": _pem(_certificate("a stranger", stranger_key, stranger_ca, stranger_ca_key)),
        "stranger_key": _pem(stranger_key),
        "junk": b"not a PEM file\n",
    }
    for name, data in files.items():
        (folder / f"{name}.pem").write_bytes(data)
    encryption = serialization.BestAvailableEncryption(KEYSTORE_PASS.encode())
    (folder / "keystore.p12").write_bytes(pkcs12.serialize_key_and_certificates(b"ts", key, cert, [ca], encryption))
    # A Java JKS keystore starts with its magic number and version (keytool -storetype JKS writes one).
    (folder / "keystore.jks").write_bytes(b"\xfe\xed\xfe\xed\x00\x00\x00\x02" + os.urandom(64))
    return Pki(folder)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tls-store")
    store = root / "store"
    store.mkdir()
    make_archive(store, "echo", ECHO, work=root / "work")
    return store


def pem_keys(pki: Pki) -> dict[str, str]:
    return {"private_key_file": str(pki.key), "certificate_file": str(pki.cert)}


@pytest.fixture(scope="module")
def pem_server(pki: Pki, store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The three ports over HTTPS, with a PEM key and certificate chain."""
    run = tmp_path_factory.mktemp("pem")
    with running_server(run, store, config=pem_keys(pki), scheme="https", verify=pki.client()) as server:
        yield server


def test_tls_pem_key_and_certificate_serve_the_three_ports(pem_server: Server, pki: Pki) -> None:
    verify = pki.client()  # trusts the test authority only; checks that the certificate names 127.0.0.1
    assert httpx.get(pem_server.inference + "/ping", verify=verify).json() == {"status": "Healthy"}
    assert httpx.get(pem_server.management + "/models", verify=verify).json()["models"][0]["modelName"] == "echo"
    metrics = httpx.get(pem_server.metrics + "/metrics", verify=verify)
    assert metrics.status_code == 200 and "Requests2XX" in metrics.text
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(pem_server.inference + "/ping")  # the system's authorities do not know ours


def test_tls_predictions_over_https_keep_alive_and_large_bodies(pem_server: Server, pki: Pki) -> None:
    big = os.urandom(3 << 20)  # many TLS records, read in many chunks
    with httpx.Client(verify=pki.client(), timeout=60) as client:
        for body in (b"hello", big, b"again"):  # one connection: the direct route answers, then reads the next
            reply = client.post(pem_server.inference + "/predictions/echo", content=body)
            assert reply.status_code == 200 and reply.content == body
        too_large = client.post(pem_server.inference + "/predictions/echo", content=b"x" * 7_000_000)
        assert too_large.status_code == 413


def test_tls_plain_http_to_an_https_port_gets_no_answer(pem_server: Server) -> None:
    with pytest.raises(httpx.TransportError):  # the TLS handshake fails (TorchServe answers 403)
        httpx.get(pem_server.inference.replace("https://", "http://") + "/ping")


def test_tls_pkcs12_keystore_on_one_port_beside_plain_http(
    pki: Pki, store: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    run, management = tmp_path_factory.mktemp("pkcs12"), free_port()
    keys = {"keystore": str(pki.folder / "keystore.p12"), "keystore_pass": KEYSTORE_PASS, "keystore_type": "PKCS12"}
    keys["management_address"] = f"http://127.0.0.1:{management}"  # after the helper's https:// one: it wins
    with running_server(run, store, config=keys, scheme="https", verify=pki.client()) as server:
        reply = httpx.post(server.inference + "/predictions/echo", content=b"p12", verify=pki.client())
        assert reply.text == "p12"
        assert httpx.get(f"http://127.0.0.1:{management}/models").status_code == 200


@pytest.fixture(scope="module")
def mutual_server(pki: Pki, store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    run = tmp_path_factory.mktemp("mutual")
    keys = pem_keys(pki) | {"client_ca_file": str(pki.client_ca)}
    with running_server(run, store, config=keys, scheme="https", verify=pki.client("client")) as server:
        yield server


def test_tls_mutual_accepts_a_client_certificate_of_client_ca_file(mutual_server: Server, pki: Pki) -> None:
    for url in (mutual_server.inference + "/ping", mutual_server.management + "/models"):
        assert httpx.get(url, verify=pki.client("client")).status_code == 200
    reply = httpx.post(mutual_server.inference + "/predictions/echo", content=b"mtls", verify=pki.client("client"))
    assert reply.text == "mtls"


@pytest.mark.parametrize("certificate", [None, "stranger"], ids=["no-certificate", "other-authority"])
def test_tls_mutual_refuses_a_client_without_an_accepted_certificate(
    mutual_server: Server, pki: Pki, certificate: str | None
) -> None:
    with pytest.raises(httpx.TransportError):
        httpx.get(mutual_server.inference + "/ping", verify=pki.client(certificate))


def test_tls_direct_route_reads_and_answers_on_a_tls_transport(pki: Pki) -> None:
    """The inference fast path (``servekit.api.http``'s direct route, on uvloop as the server runs it) behind the
    TLS transport that the server's context wraps each connection in."""

    class Echo:
        limit = 1 << 20

        def __init__(self) -> None:
            self.schemes: list[str] = []

        def matches(self, method: str, path: str) -> bool:
            return path == "/echo"

        async def __call__(self, scope: dict[str, Any], body: bytes) -> Response:
            self.schemes.append(scope["scheme"])
            return Response(body, 200)

        def too_large(self, scope: dict[str, Any], size: int) -> Response:
            return Response(b"too large", 413)

        def refuse(self, scope: dict[str, Any]) -> None:
            return None

    async def fallback(scope: Scope, receive: Receive, send: Send) -> None:
        await Response(b"not the direct route", 404)(scope, receive, send)

    class Quiet(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield

    route, port = Echo(), free_port()
    context = server_context(settings_from({"inference_address": f"https://127.0.0.1:{port}"} | pem_keys(pki)))
    bodies = [b"one", os.urandom(900_000), b"two"]

    async def main() -> list[httpx.Response]:
        config = uvicorn.Config(
            fallback, host="127.0.0.1", port=port, http=protocol_with(10, 60, route), lifespan="off", log_level="error"
        )
        config.load()
        config.ssl = context
        server = Quiet(config)
        task = asyncio.create_task(server.serve())
        while not server.started:
            await asyncio.sleep(0.01)
        try:
            async with httpx.AsyncClient(verify=pki.client(), base_url=f"https://127.0.0.1:{port}") as client:
                replies = [await client.post("/echo", content=body) for body in bodies]
                replies.append(await client.post("/echo", content=b"x" * (2 << 20)))
                replies.append(await client.get("/other"))
                return replies
        finally:
            server.should_exit = True
            await task

    replies = uvloop.run(main())
    assert [r.content for r in replies[:3]] == bodies
    assert route.schemes == ["https"] * 3
    assert [r.status_code for r in replies[3:]] == [413, 404]


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"private_key_file": "other_key", "certificate_file": "cert"}, "private_key_file: the key of .* is not the"),
        ({"private_key_file": "encrypted_key", "certificate_file": "cert"}, "private_key_file: .* is encrypted"),
        ({"private_key_file": "junk", "certificate_file": "cert"}, "private_key_file: .* holds no PEM private key"),
        ({"private_key_file": "missing", "certificate_file": "cert"}, "private_key_file: cannot read .*missing"),
        ({"private_key_file": "key", "certificate_file": "junk"}, "certificate_file: .* holds no PEM certificate"),
        ({"private_key_file": "key", "certificate_file": "missing"}, "certificate_file: cannot read"),
        ({"private_key_file": "key"}, "certificate_file: not set, and private_key_file needs it"),
        ({}, "inference_address: https:// needs the server's key and certificate: set keystore"),
        ({"keystore": "keystore.p12", "keystore_pass": "wrong"}, "keystore: cannot open .* with keystore_pass"),
        ({"keystore": "keystore.p12"}, "keystore: cannot open"),  # the default password, changeit
        ({"keystore": "keystore.jks"}, "keystore: .* is a Java JKS keystore; .* keytool -importkeystore -srckeystore"),
        ({"keystore": "missing"}, "keystore: cannot read"),
        ({"keystore": "keystore.p12", "keystore_type": "BKS"}, "keystore_type: servekit reads PKCS12"),
        ({"private_key_file": "key", "certificate_file": "cert", "client_ca_file": "junk"}, "client_ca_file: .* holds"),
        ({"private_key_file": "key", "certificate_file": "cert", "client_ca_file": "nope"}, "client_ca_file: cannot"),
    ],
)
def test_tls_bad_keys_are_config_errors_naming_the_key(pki: Pki, keys: dict[str, str], message: str) -> None:
    values = {"inference_address": "https://127.0.0.1:8443"}
    for key, name in keys.items():
        values[key] = name if key in ("keystore_pass", "keystore_type") else str(_file(pki, name))
    with pytest.raises(ConfigError, match=message):
        server_context(settings_from(values))


def _file(pki: Pki, name: str) -> Path:
    return pki.folder / (name if "." in name else f"{name}.pem")


def test_tls_jks_error_gives_the_keytool_command(pki: Pki) -> None:
    values = {"inference_address": "https://127.0.0.1:8443", "keystore": str(pki.folder / "keystore.jks")}
    with pytest.raises(ConfigError) as caught:
        server_context(settings_from(values))
    jks, p12 = pki.folder / "keystore.jks", pki.folder / "keystore-pkcs12.p12"  # keystore.p12 is taken
    command = f"keytool -importkeystore -srckeystore {jks} -destkeystore {p12} -deststoretype PKCS12"
    assert command in caught.value.message and f"set keystore={p12}" in caught.value.message


def test_tls_rsa_key_in_openssl_traditional_form_is_read(pki: Pki) -> None:
    keys = {"private_key_file": str(_file(pki, "rsa_key")), "certificate_file": str(_file(pki, "rsa_cert"))}
    context = server_context(settings_from({"metrics_address": "https://127.0.0.1:8445"} | keys))
    assert context is not None and context.verify_mode == ssl.CERT_NONE


def test_tls_no_https_address_builds_no_context(pki: Pki) -> None:
    assert server_context(settings_from({"private_key_file": str(pki.junk)})) is None  # keys unused: not read


def _start(tmp_path: Path, keys: dict[str, str], store: Path, foreground: bool) -> subprocess.CompletedProcess[str]:
    ports = [free_port() for _ in range(3)]
    config = write_config(tmp_path / "config.properties", ports, keys, "https")
    args = [SERVEKIT, "start", "--model-store", str(store), "--models", "echo=echo.mar", "--ts-config", str(config)]
    args += ["--ncs", "--disable-token-auth", *(["--foreground"] if foreground else [])]
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    return subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("foreground", [True, False], ids=["foreground", "background"])
@pytest.mark.parametrize(
    ("keys", "named"),
    [
        ({"private_key_file": "other_key", "certificate_file": "cert"}, "servekit: private_key_file: the key of"),
        ({"keystore": "keystore.p12", "keystore_pass": "wrong"}, "servekit: keystore: cannot open"),
    ],
    ids=["mismatched-key", "wrong-password"],
)
def test_tls_start_with_a_bad_key_exits_1_naming_it(
    tmp_path: Path, pki: Pki, store: Path, keys: dict[str, str], named: str, foreground: bool
) -> None:
    values = {k: v if k == "keystore_pass" else str(_file(pki, v)) for k, v in keys.items()}
    result = _start(tmp_path, values, store, foreground)
    assert result.returncode == 1
    assert result.stderr.startswith(named), result.stdout + result.stderr
    assert not (tmp_path / ".servekit.pid").exists()  # nothing was started


@pytest.mark.parametrize("mutual", [False, True], ids=["https", "mutual-tls"])
def test_tls_background_start_returns_once_started_over_https(
    tmp_path: Path, pki: Pki, store: Path, mutual: bool
) -> None:
    """``servekit start`` (no ``--foreground``) calls ``/ping`` over HTTPS; with client certificates required it
    cannot, and waits for the server's ``Model server started.`` instead."""
    keys = pem_keys(pki) | ({"client_ca_file": str(pki.client_ca)} if mutual else {})
    result = _start(tmp_path, keys, store, foreground=False)
    try:
        assert result.returncode == 0, result.stdout + result.stderr
        assert "servekit started" in result.stdout
        assert "Model server started." in (tmp_path / "logs" / "servekit.log").read_text()
    finally:
        env = {**os.environ, "TMPDIR": str(tmp_path)}
        subprocess.run([SERVEKIT, "stop"], cwd=tmp_path, env=env, capture_output=True, timeout=60)


def test_tls_keys_read_from_config_and_ts_variables(tmp_path: Path) -> None:
    config = tmp_path / "config.properties"
    lines = ["enable_envvars_config=true", "inference_address=HTTPS://0.0.0.0:8443", "keystore=ks.p12"]
    config.write_text("\n".join(lines) + "\n")
    settings = load_settings(config, environ={"TS_KEYSTORE_PASS": "from-env", "TS_CLIENT_CA_FILE": "~/ca.pem"})
    assert settings.inference_address == Address("0.0.0.0", 8443, "https")
    assert str(settings.inference_address) == "https://0.0.0.0:8443"
    assert settings.keystore == Path("ks.p12").resolve() and settings.keystore_pass == "from-env"
    assert settings.client_ca_file == Path("~/ca.pem").expanduser()
    assert (settings.keystore_type, str(settings.management_address)) == ("PKCS12", "http://127.0.0.1:8081")
