"""Where a model download may connect. A URL's host is resolved once and every address it resolves to is checked
before any connection is made; ``servekit.download`` then connects to a checked address, never resolving again, so a
name that answers differently the second time (DNS rebinding) cannot move the connection.

Refused, unless a pattern of ``allowed_urls`` names that exact IP address and admits the URL with the address in place
of the host (the operator allowed it outright):

- loopback addresses (127.0.0.0/8, ::1);
- link-local addresses (169.254.0.0/16, fe80::/10), where cloud metadata services answer (169.254.169.254), and the
  metadata addresses outside them (``METADATA``);
- unspecified addresses (0.0.0.0/8, ::), which reach this machine;
- this server's own listening addresses: every address of this machine when a port listens on 0.0.0.0 or ::.

Always refused: a port this server listens on, at one of its addresses (it serves no archive). An IPv4 address carried
in an IPv6 one (``::ffff:a.b.c.d``, 64:ff9b::/96, 2002::/16) is checked as that IPv4 address. Private networks
(10/8, 172.16/12, 192.168/16, fc00::/7) are allowed: in-cluster model stores live there.

Look-ups go to the system's resolver. ``Settings.test_hosts`` (tests only) answers names under ``.test``, which no DNS
resolves (RFC 6761), from a hosts file; it changes no other name, and its answers are checked like any others.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from servekit.errors import DownloadError
from servekit.settings import Settings

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolve = Callable[[str, int], Awaitable[list[str]]]
"""A resolver: ``(host, port)`` to the host's addresses, as text; ``OSError`` when it has none."""

METADATA = frozenset(ipaddress.ip_address(a) for a in ("169.254.169.254", "fd00:ec2::254", "100.100.100.200"))
WILDCARDS = ("", "0.0.0.0", "::")
DEFAULT_PORTS = {"http": 80, "https": 443}
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_ZERO = ipaddress.ip_network("0.0.0.0/8")


@dataclass(frozen=True, slots=True)
class Listening:
    """The server's own addresses: ``(address, port)`` per listening port, the address None for a wildcard."""

    endpoints: frozenset[tuple[IPAddress | None, int]]

    def holds(self, ip: IPAddress) -> bool:
        """Whether ``ip`` is an address the server listens on."""
        if any(address == ip for address, _ in self.endpoints):
            return True
        return any(address is None for address, _ in self.endpoints) and _is_local(ip)

    def serves(self, ip: IPAddress, port: int) -> bool:
        """Whether a connection to ``ip:port`` would reach one of the server's own ports."""
        return any(p == port and (a == ip or (a is None and _is_local(ip))) for a, p in self.endpoints)


async def listening(settings: Settings) -> Listening:
    """The addresses and ports that ``settings`` makes the server listen on (REST, and gRPC unless disabled)."""
    hosts = [(a.host, a.port) for a in (settings.inference_address, settings.management_address)]
    hosts.append((settings.metrics_address.host, settings.metrics_address.port))
    if settings.enable_grpc:
        hosts += [(settings.grpc_inference_address, settings.grpc_inference_port)]
        hosts += [(settings.grpc_management_address, settings.grpc_management_port)]
    endpoints: set[tuple[IPAddress | None, int]] = set()
    loop = asyncio.get_running_loop()
    for host, port in hosts:
        if host in WILDCARDS:
            endpoints.add((None, port))
            continue
        try:
            endpoints.add((ipaddress.ip_address(host), port))
        except ValueError:  # a name, such as localhost
            for *_, sockaddr in await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM):
                endpoints.add((_address(str(sockaddr[0])), port))
    return Listening(frozenset(endpoints))


def _is_local(ip: IPAddress) -> bool:
    """Whether ``ip`` is an address of this machine: only those can be bound."""
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind((str(ip), 0))
        except OSError:
            return False
    return True


def _address(text: str) -> IPAddress:
    """An address as resolved, without an IPv6 zone, as the IPv4 address it carries if it carries one."""
    ip = ipaddress.ip_address(text.partition("%")[0])
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
        if ip in _NAT64:
            return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if ip.sixtofour is not None:
            return ip.sixtofour
    return ip


def _rule(ip: IPAddress, own: Listening) -> str | None:
    """The rule that refuses ``ip`` unless ``allowed_urls`` names it, or None."""
    if ip.is_loopback:
        return "a loopback address (127.0.0.0/8, ::1)"
    if ip.is_link_local:
        return "a link-local address (169.254.0.0/16, fe80::/10, where cloud metadata services answer)"
    if ip in METADATA:
        return "a cloud metadata address"
    if ip.is_unspecified or ip in _ZERO:
        return "an unspecified address (0.0.0.0/8, ::), which reaches this machine"
    if own.holds(ip):
        return "one of this server's own listening addresses"
    return None


def names(allowed: Sequence[str], ip: IPAddress, url: str) -> bool:
    """Whether a pattern of ``allowed`` names ``ip`` (written out, dots escaped or not) and admits ``url`` with ``ip``
    as its host: the operator allowed that address outright."""
    parts = urlsplit(url)
    host = f"[{ip}]" if ip.version == 6 else str(ip)
    direct = urlunsplit(parts._replace(netloc=host + (f":{parts.port}" if parts.port else "")))
    edge = "[0-9.]" if ip.version == 4 else "[0-9a-fA-F:]"
    written = re.compile(rf"(?<!{edge}){re.escape(str(ip))}(?!{edge})")
    return any(written.search(re.sub(r"\\(.)", r"\1", p)) and re.fullmatch(p, direct) for p in allowed)


async def checked_addresses(url: str, settings: Settings, resolve: Resolve) -> list[str]:
    """The addresses of ``url``'s host (an ``allowed_urls``-checked, normalised URL), each checked; a
    ``DownloadError`` naming the rule when any is refused, or when the host does not resolve."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or DEFAULT_PORTS[parts.scheme]
    try:
        found = await resolve(host, port)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise DownloadError(f"Failed to download archive from: {url} (cannot resolve {host}: {reason})") from None
    if not found:
        raise DownloadError(f"Failed to download archive from: {url} (cannot resolve {host}: no address)")
    own = await listening(settings)
    checked: list[str] = []
    for text in found:
        ip = _address(text)
        subject = f"{ip} is" if host == text else f"{host} resolves to {ip},"
        if own.serves(ip, port):
            raise DownloadError(f"Refused to download {url}: it would connect to {ip}:{port}, this server's own port")
        rule = _rule(ip, own)
        if rule is not None and not names(settings.allowed_urls, ip, url):
            raise DownloadError(
                f"Refused to download {url}: {subject} {rule}; refused unless allowed_urls names {ip} outright"
            )
        if str(ip) not in checked:
            checked.append(str(ip))
    return checked


def resolver(hosts_file: Path | None) -> Resolve:
    """The system's resolver, with ``hosts_file`` (``Settings.test_hosts``) answering the names under ``.test``."""

    async def resolve(host: str, port: int) -> list[str]:
        name = host.lower().rstrip(".")
        if hosts_file is not None and name.endswith(".test"):
            found = hosts_answers(hosts_file).get(name)
            if not found:
                raise OSError(f"{name} is not in {hosts_file}")
            return found
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        return [str(sockaddr[0]) for *_, sockaddr in infos]

    return resolve


def hosts_answers(path: Path) -> dict[str, list[str]]:
    """A hosts file's answers (``ADDRESS NAME...`` lines, ``#`` comments), each name's addresses in file order;
    every name must end in ``.test``."""
    answers: dict[str, list[str]] = {}
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise DownloadError(f"SERVEKIT_TEST_HOSTS: cannot read {path}: {exc.strerror}") from None
    for number, line in enumerate(lines, 1):
        address, *hosts = line.partition("#")[0].split() or [""]
        if not address:
            continue
        try:
            ipaddress.ip_address(address)
        except ValueError:
            raise DownloadError(f"SERVEKIT_TEST_HOSTS {path}, line {number}: {address!r} is no IP address") from None
        for host in hosts:
            if not host.lower().endswith(".test"):
                raise DownloadError(f"SERVEKIT_TEST_HOSTS {path}, line {number}: {host} does not end in .test")
            answers.setdefault(host.lower(), []).append(address)
    return answers
