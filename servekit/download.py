"""Fetch a model archive from an http(s) URL that ``allowed_urls`` admits, from an address that may be reached.

The URL is parsed and checked before any byte is fetched: scheme http or https, a host, no user info, and the
normalised ``scheme://host[:port]/path`` must fully match one of the ``allowed_urls`` patterns. Its host is then
resolved once and every address checked (``servekit.destination``: no loopback, link-local or metadata address, none
of the server's own, unless ``allowed_urls`` names it), and the request goes to a checked address, with the URL's
host in ``Host`` and, for https, in the TLS server name and the certificate check (against the system's certificate
authorities, or ``SSL_CERT_FILE``/``SSL_CERT_DIR``). No proxy is used (``HTTP(S)_PROXY`` would resolve the name
again). Redirects are followed by hand, each target checked the same way. The download is bounded in bytes and in
time and streamed to a temp file in the model store, renamed into place only when complete: a refusal leaves the
store as it was.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import ssl
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Sequence
from pathlib import Path, PurePosixPath
from typing import TypeVar
from urllib.parse import unquote, urljoin, urlsplit

import httpx

from servekit.destination import Resolve, checked_addresses, resolver
from servekit.errors import ConflictError, DownloadError
from servekit.settings import Settings

T = TypeVar("T")

MAX_REDIRECTS = 5


def is_remote(url: str) -> bool:
    return urlsplit(url).scheme.lower() in ("http", "https")


def check_url(url: str, allowed: Sequence[str]) -> str:
    """The normalised URL if it is allowed; ``DownloadError`` saying why not otherwise."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise DownloadError(f"Invalid URL {url!r}: {exc}") from None
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise DownloadError(f"Invalid URL {url!r}: only http(s) URLs with a host can be downloaded")
    if parts.username is not None or parts.password is not None:
        raise DownloadError(f"Given URL {url} does not match any allowed URL(s): user info is not allowed")
    if any(segment in (".", "..") for segment in unquote(parts.path).split("/")):
        raise DownloadError(f"Relative path is not allowed in url: {url}")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    normalised = f"{parts.scheme.lower()}://{host}{f':{port}' if port else ''}{parts.path or '/'}"
    if parts.query:
        normalised += f"?{parts.query}"
    if not any(re.fullmatch(pattern, normalised) for pattern in allowed):
        raise DownloadError(f"Given URL {url} does not match any allowed URL(s)")
    return normalised


def archive_name(url: str) -> str:
    """The file name a download is stored under: the URL path's last element."""
    name = PurePosixPath(unquote(urlsplit(url).path)).name
    if not name or name in (".", "..") or "/" in name or "\\" in name or name.startswith("."):
        raise DownloadError(f"Cannot derive an archive file name from URL {url}")
    return name


async def download(
    url: str,
    store: Path,
    settings: Settings,
    *,
    resolve: Resolve | None = None,
    verify: ssl.SSLContext | bool = True,
) -> Path:
    """Download ``url`` into ``store``, within ``settings``' ``allowed_urls``, ``max_download_size`` and
    ``download_timeout``; the file must not exist yet (``ConflictError``). ``resolve`` (the system's resolver, or
    ``test_hosts``' stand-in) and ``verify`` (the system's certificate authorities) are for tests."""
    allowed = settings.allowed_urls
    current = check_url(url, allowed)
    target = store / archive_name(url)
    if target.exists():
        raise ConflictError(f"Model file already exists {target.name}")
    deadline = time.monotonic() + settings.download_timeout
    resolve = resolver(settings.test_hosts) if resolve is None else resolve
    try:
        for _ in range(MAX_REDIRECTS + 1):
            addresses = await _before(deadline, checked_addresses(current, settings, resolve), url)
            async with _get(current, addresses, settings.download_timeout, verify) as response:
                if response.is_redirect:
                    current = check_url(urljoin(current, response.headers.get("location", "")), allowed)
                    continue
                if response.status_code != 200:
                    raise DownloadError(f"Failed to download archive from: {url} (HTTP {response.status_code})")
                return await _save(response, target, settings.max_download_size, deadline, url)
    except httpx.HTTPError as exc:
        raise DownloadError(f"Failed to download archive from: {url} ({type(exc).__name__}: {exc})") from None
    raise DownloadError(f"Failed to download archive from: {url} (more than {MAX_REDIRECTS} redirects)")


async def _before(deadline: float, step: Awaitable[T], url: str) -> T:
    try:
        return await asyncio.wait_for(step, max(0.0, deadline - time.monotonic()))
    except TimeoutError:
        raise DownloadError(f"Download of {url} took longer than its time limit") from None


@contextlib.asynccontextmanager
async def _get(
    url: str, addresses: Sequence[str], timeout: float, verify: ssl.SSLContext | bool
) -> AsyncIterator[httpx.Response]:
    """``GET url`` from the first of ``addresses`` that accepts the connection, the URL's host kept for ``Host``, the
    TLS server name and the certificate check. A client per request: no connection is shared across hosts."""
    parts = httpx.URL(url)
    headers = {"Host": parts.netloc.decode("ascii")}
    extensions = {"sni_hostname": parts.raw_host.decode("ascii")} if parts.scheme == "https" else {}
    # No proxy from the environment (it would resolve the name again) and no .netrc; the transport still reads
    # SSL_CERT_FILE / SSL_CERT_DIR, for a model store with a private certificate authority.
    transport = httpx.AsyncHTTPTransport(verify=verify, trust_env=True)
    client = httpx.AsyncClient(follow_redirects=False, timeout=timeout, trust_env=False, transport=transport)
    async with client:
        for index, address in enumerate(addresses):
            request = client.build_request("GET", parts.copy_with(host=address), headers=headers, extensions=extensions)
            try:
                response = await client.send(request, stream=True)
            except httpx.ConnectError:
                if index == len(addresses) - 1:
                    raise
                continue
            try:
                yield response
            finally:
                await response.aclose()
            return


async def _save(response: httpx.Response, target: Path, max_bytes: int, deadline: float, url: str) -> Path:
    declared = response.headers.get("content-length")
    if declared and declared.isascii() and declared.isdigit() and int(declared) > max_bytes:
        raise DownloadError(f"Archive at {url} is {declared} bytes, over the limit of {max_bytes}")
    fd, temp_name = tempfile.mkstemp(dir=target.parent, prefix=".download-")
    temp = Path(temp_name)
    try:
        with os.fdopen(fd, "wb") as handle:
            size = 0
            async for chunk in response.aiter_bytes():
                size += len(chunk)
                if size > max_bytes:
                    raise DownloadError(f"Archive at {url} exceeds the download limit of {max_bytes} bytes")
                if time.monotonic() > deadline:
                    raise DownloadError(f"Download of {url} took longer than its time limit")
                handle.write(chunk)
        temp.rename(target)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return target
