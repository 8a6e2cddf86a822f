"""Model downloads cannot be turned against the network (server-side request forgery, TorchServe's CVE-2023-43654):
the host of an admitted URL is resolved once and every address checked before connecting (loopback, link-local and
metadata, unspecified, the server's own addresses and ports refused unless ``allowed_urls`` names the address), the
connection goes to the checked address with the name kept for ``Host`` and TLS, and redirects are checked the same
way. Each refusal is a 400 naming the rule, and the model store is left as it was.

Names resolve through ``SERVEKIT_TEST_HOSTS``, a hosts file that answers ``.test`` names (which no DNS resolves), so
no test touches the network: every connection made is to 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import http.server
import ipaddress
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from servekit.config import settings_from
from servekit.destination import hosts_answers, names
from servekit.download import download
from servekit.errors import DownloadError
from tests.helpers import Server, make_archive, running_server

VERSION_HANDLER = """
def handle(data, context):
    if data is None:
        return None
    return [context.manifest["model"]["modelVersion"]] * len(data)
"""
HOSTS = """
# address       names
127.0.0.1       named.test loop.test
198.51.100.7    mixed.test
127.0.0.1       mixed.test
169.254.169.254 metadata.test
::1             loop6.test
fe80::1         linklocal6.test
::ffff:127.0.0.1 mapped.test
0.0.0.0         zero.test
"""


@dataclass
class Remote:
    """A local HTTP server: ``/ok/dl.mar`` is an archive, ``/ok/redirect/<host>/<port>/dl.mar`` redirects to
    ``http://<host>:<port>/ok/dl.mar``. ``hits`` records (port, path, Host header) of every request; ``other`` is a
    second port of the same kind, that ``allowed_urls`` does not name by address."""

    archive: bytes
    allowed: int = 0
    other: int = 0
    hits: list[tuple[int, str, str]] = field(default_factory=list)


@contextlib.contextmanager
def serve(remote: Remote, context: ssl.SSLContext | None = None) -> Iterator[list[int]]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            port = int(self.server.server_address[1])  # type: ignore[index]
            remote.hits.append((port, self.path, self.headers.get("Host", "")))
            if self.path.startswith("/ok/redirect/"):
                _, _, _, host, to_port, name = self.path.split("/")
                self.send_response(302)
                self.send_header("Location", f"http://{host}:{to_port}/ok/{name}")
                self.send_header("Content-Length", "0")
                self.end_headers()
            elif self.path == "/ok/dl.mar":
                self.send_response(200)
                self.send_header("Content-Length", str(len(remote.archive)))
                self.end_headers()
                self.wfile.write(remote.archive)
            else:
                self.send_error(404)

        def log_message(self, format: str, *args: object) -> None:
            pass

    servers = [http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler) for _ in range(2)]
    if context is not None:
        for s in servers:
            s.socket = context.wrap_socket(s.socket, server_side=True)
    threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in servers]
    for thread in threads:
        thread.start()
    try:
        yield [int(s.server_address[1]) for s in servers]
    finally:
        for s in servers:
            s.shutdown()
            s.server_close()


@pytest.fixture(scope="module")
def remote(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Remote]:
    folder = tmp_path_factory.mktemp("remote")
    path = make_archive(folder, "dl", VERSION_HANDLER, work=tmp_path_factory.mktemp("work"), version="3.1")
    remote = Remote(path.read_bytes())
    with serve(remote) as (remote.allowed, remote.other):
        yield remote


def properties(*patterns: str) -> str:
    """``allowed_urls`` as config.properties needs it: backslashes doubled."""
    return ",".join(patterns).replace("\\", "\\\\")


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("store")


@pytest.fixture(scope="module")
def server(store: Path, remote: Remote, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("run")
    hosts = root / "hosts"
    hosts.write_text(HOSTS)
    allowed = properties(
        r"http://[a-z0-9]+\.test:\d+/ok/.*",  # any .test name, any port
        rf"http://127\.0\.0\.1:{remote.allowed}/ok/.*",  # names 127.0.0.1, for the allowed port only
        r"http://\d+\.\d+\.\d+\.\d+:\d+/ok/.*",  # any IPv4 address, none named
        r"http://\[[0-9a-f:]+\]:\d+/ok/.*",  # any IPv6 address, none named
        r"http://127\.0\.0\.1:\d+/own/.*",  # names 127.0.0.1, on every port: the server's own ones stay refused
    )
    config = {"allowed_urls": allowed, "default_workers_per_model": "0"}
    with pytest.MonkeyPatch.context() as env:
        env.setenv("SERVEKIT_TEST_HOSTS", str(hosts))
        args = ("--disable-token-auth", "--ncs", "--enable-model-api")
        with running_server(root / "work", store, config=config, args=args) as running:
            yield running


def register(server: Server, url: str) -> httpx.Response:
    return httpx.post(server.management + "/models", params={"url": url}, timeout=60)


def test_download_connects_to_the_checked_address_keeping_the_host_name(
    server: Server, store: Path, remote: Remote
) -> None:
    """named.test is known only to the test resolver: the download can only have gone to the address it answered."""
    before = len(remote.hits)
    response = register(server, f"http://named.test:{remote.allowed}/ok/dl.mar")
    assert response.status_code == 200, response.text
    try:
        assert remote.hits[before:] == [(remote.allowed, "/ok/dl.mar", f"named.test:{remote.allowed}")]
        assert (store / "dl.mar").read_bytes() == remote.archive
    finally:
        assert httpx.delete(server.management + "/models/dl", timeout=60).status_code == 200
    assert not (store / "dl.mar").exists()


@pytest.mark.parametrize(
    ("url", "words"),
    [
        # a name that the allow-list admits, resolving to a loopback address that it does not name for that port
        ("http://loop.test:{other}/ok/dl.mar", "loop.test resolves to 127.0.0.1, a loopback address"),
        # every address is checked: one bad address among good ones refuses the host
        ("http://mixed.test:{other}/ok/dl.mar", "mixed.test resolves to 127.0.0.1, a loopback address"),
        ("http://metadata.test:{other}/ok/dl.mar", "resolves to 169.254.169.254, a link-local address"),
        ("http://169.254.169.254:80/ok/dl.mar", "169.254.169.254 is a link-local address"),
        ("http://loop6.test:{other}/ok/dl.mar", "resolves to ::1, a loopback address"),
        ("http://linklocal6.test:{other}/ok/dl.mar", "resolves to fe80::1, a link-local address"),
        ("http://mapped.test:{other}/ok/dl.mar", "resolves to 127.0.0.1, a loopback address"),
        ("http://zero.test:{other}/ok/dl.mar", "resolves to 0.0.0.0, an unspecified address"),
        ("http://127.0.0.1:{other}/ok/dl.mar", "127.0.0.1 is a loopback address"),
        ("http://[::1]:{other}/ok/dl.mar", "::1 is a loopback address"),
        # the allow-list names 127.0.0.1 for /own/ on every port, but not this server's own ports
        ("http://127.0.0.1:{management}/own/dl.mar", "this server's own port"),
        ("http://127.0.0.1:{inference}/own/dl.mar", "this server's own port"),
        ("http://unknown.test:{other}/ok/dl.mar", "cannot resolve unknown.test"),
    ],
)
def test_download_to_a_refused_address_is_400_naming_the_rule_and_connects_nowhere(
    server: Server, store: Path, remote: Remote, url: str, words: str
) -> None:
    listing = sorted(p.name for p in store.iterdir())
    before = len(remote.hits)
    ports = {
        "other": remote.other,
        "management": server.management.rpartition(":")[2],
        "inference": server.inference.rpartition(":")[2],
    }
    response = register(server, url.format(**ports))
    assert response.status_code == 400, response.text
    assert response.json()["type"] == "DownloadArchiveException"
    message = response.json()["message"]
    assert words in message, message
    if " address" in words:  # the exception is named too
        assert "refused unless allowed_urls names" in message
    assert remote.hits[before:] == []
    assert sorted(p.name for p in store.iterdir()) == listing


@pytest.mark.parametrize(
    ("to", "words"),
    [
        ("loop.test/{other}", "loop.test resolves to 127.0.0.1, a loopback address"),
        ("metadata.test/80", "metadata.test resolves to 169.254.169.254, a link-local address"),
        ("169.254.169.254/80", "169.254.169.254 is a link-local address"),
        ("127.0.0.1/{other}", "127.0.0.1 is a loopback address"),
    ],
)
def test_download_redirected_to_a_refused_address_is_400_and_the_target_never_reached(
    server: Server, store: Path, remote: Remote, to: str, words: str
) -> None:
    listing = sorted(p.name for p in store.iterdir())
    before = len(remote.hits)
    path = f"/ok/redirect/{to.format(other=remote.other)}/dl.mar"
    response = register(server, f"http://named.test:{remote.allowed}{path}")
    assert response.status_code == 400, response.text
    assert words in response.json()["message"], response.json()
    assert remote.hits[before:] == [(remote.allowed, path, f"named.test:{remote.allowed}")]  # the redirect only
    assert sorted(p.name for p in store.iterdir()) == listing


def test_download_follows_a_redirect_to_an_allowed_address(server: Server, store: Path, remote: Remote) -> None:
    before = len(remote.hits)
    path = f"/ok/redirect/127.0.0.1/{remote.allowed}/dl.mar"
    response = register(server, f"http://named.test:{remote.allowed}{path}")
    assert response.status_code == 200, response.text
    try:
        assert [hit[:2] for hit in remote.hits[before:]] == [(remote.allowed, path), (remote.allowed, "/ok/dl.mar")]
    finally:
        assert httpx.delete(server.management + "/models/dl", timeout=60).status_code == 200


# ---- in process: the resolver is called once per hop, and TLS checks the name, not the address ----


def test_download_resolves_each_host_once_so_a_rebinding_name_cannot_move_the_connection(
    tmp_path: Path, remote: Remote
) -> None:
    """The name answers 127.0.0.1 (allowed: the allow-list names it) the first time, the metadata address after: the
    request still reaches 127.0.0.1, because nothing resolves the name a second time."""
    calls: list[str] = []

    async def rebinding(host: str, port: int) -> list[str]:
        calls.append(host)
        return ["127.0.0.1"] if len(calls) == 1 else ["169.254.169.254"]

    settings = settings_from(
        {"allowed_urls": rf"http://rebind\.test:\d+/ok/.*,http://127\.0\.0\.1:{remote.allowed}/ok/.*"}
    )
    before = len(remote.hits)
    url = f"http://rebind.test:{remote.allowed}/ok/dl.mar"
    path = asyncio.run(download(url, tmp_path, settings, resolve=rebinding))
    assert path.read_bytes() == remote.archive
    assert calls == ["rebind.test"]
    assert remote.hits[before:] == [(remote.allowed, "/ok/dl.mar", f"rebind.test:{remote.allowed}")]


Issuer = tuple[x509.Certificate, ec.EllipticCurvePrivateKey]


def certificate(name: str, key: ec.EllipticCurvePrivateKey, issuer: Issuer | None) -> x509.Certificate:
    """A CA certificate (no ``issuer``), or a server certificate for the DNS name ``name`` that ``issuer`` signs."""
    now = datetime.datetime.now(datetime.UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject if issuer is None else issuer[0].subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
    )
    if issuer is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
    return builder.sign(key if issuer is None else issuer[1], hashes.SHA256())


@pytest.mark.parametrize("certified", ["secure.test", "other.test"])
def test_https_download_checks_the_certificate_against_the_host_name(
    tmp_path: Path, remote: Remote, certified: str
) -> None:
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = certificate("test CA", ca_key, None)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = certificate(certified, key, (ca, ca_key))
    (tmp_path / "server.pem").write_bytes(
        cert.public_bytes(serialization.Encoding.PEM)
        + key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    names_sent: list[str | None] = []

    def record_name(_: ssl.SSLObject | ssl.SSLSocket, name: str | None, __: ssl.SSLContext) -> None:
        names_sent.append(name)

    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(tmp_path / "server.pem")
    server_context.sni_callback = record_name
    client_context = ssl.create_default_context(cadata=ca.public_bytes(serialization.Encoding.PEM).decode())

    async def local(host: str, port: int) -> list[str]:
        return ["127.0.0.1"]

    tls_remote = Remote(remote.archive)
    with serve(tls_remote, server_context) as (port, _):
        settings = settings_from({"allowed_urls": rf"https://secure\.test:\d+/ok/.*,https://127\.0\.0\.1:{port}/ok/.*"})
        store = tmp_path / "store"
        store.mkdir()
        url = f"https://secure.test:{port}/ok/dl.mar"
        if certified == "secure.test":
            path = asyncio.run(download(url, store, settings, resolve=local, verify=client_context))
            assert path.read_bytes() == remote.archive
            assert tls_remote.hits == [(port, "/ok/dl.mar", f"secure.test:{port}")]
        else:
            with pytest.raises(DownloadError, match="certificate"):
                asyncio.run(download(url, store, settings, resolve=local, verify=client_context))
            assert tls_remote.hits == [] and list(store.iterdir()) == []
    assert names_sent and set(names_sent) == {"secure.test"}


# ---- the rules, directly ----


def test_allowed_urls_names_an_address_only_when_written_out_and_admitting_that_url() -> None:
    url = "http://models.test:9000/ok/m.mar"
    loopback = ipaddress.ip_address("127.0.0.1")
    assert names([r"http://127\.0\.0\.1:9000/ok/.*"], loopback, url)
    assert names(["http://127.0.0.1:9000/.*"], loopback, url)
    assert names([r"http://\[::1\]:9000/.*"], ipaddress.ip_address("::1"), url)
    assert not names([r"http://.*"], loopback, url)  # admits it, but does not name it
    assert not names([r"http://127\.0\.0\.\d+:9000/.*"], loopback, url)
    assert not names([r"http://127\.0\.0\.10:9000/.*"], loopback, url)
    assert not names([r"http://127\.0\.0\.1:8000/.*"], loopback, url)  # names it, for another port
    assert not names([r"http://127\.0\.0\.1:9000/other/.*"], loopback, url)


def test_test_hosts_answers_only_names_under_test(tmp_path: Path) -> None:
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 a.test B.Test  # comment\n\n198.51.100.7 a.test\n")
    assert hosts_answers(hosts) == {"a.test": ["127.0.0.1", "198.51.100.7"], "b.test": ["127.0.0.1"]}
    hosts.write_text("203.0.113.9 models.example.com\n")
    with pytest.raises(DownloadError, match=r"models\.example\.com does not end in \.test"):
        hosts_answers(hosts)
    hosts.write_text("localhost a.test\n")
    with pytest.raises(DownloadError, match="is no IP address"):
        hosts_answers(hosts)
