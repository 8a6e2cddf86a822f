"""The server process: builds the registry and the three apps (and the two gRPC ports, ``servekit.grpc``, unless
``enable_grpc=false``), binds the ports, loads the startup models (from the latest snapshot if there is one, else
``load_models``), and owns signals and shutdown.

SIGTERM or SIGINT: ``/ping`` turns unhealthy and the listeners close at once (the gRPC ports refuse new calls);
requests in flight and queued finish within ``drain_timeout`` (30 s); then the workers get ``WORKER_EXIT_S`` to
exit (else they are killed) and the process exits 0, so shutdown takes at most ``drain_timeout`` + 5 s (+ 2 s to
reap a killed worker). A second signal exits at once (code 1); the workers die with the front end (they ask the
kernel for that).
``/ping`` answers ``Unhealthy`` until every startup model is loaded. With token authorization on
(the default), ``key_file.json`` is written in the working directory at start and removed at exit, unless the keys
are supplied (``key_file`` or ``SERVEKIT_<KIND>_KEY``, ``servekit.api.keys``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import signal
import socket
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import uvicorn
from starlette.types import ASGIApp

from servekit import heap, logs, snapshot
from servekit.api.access import AccessLog
from servekit.api.auth import TokenStore
from servekit.api.http import DirectRoute, protocol_with
from servekit.api.inference import create_inference_app
from servekit.api.keys import supplied_keys
from servekit.api.management import create_management_app
from servekit.api.metrics import create_metrics_app
from servekit.api.response import NO_CACHE
from servekit.archive import ARCHIVE_SUFFIXES, open_archive
from servekit.errors import ConfigError, ServekitError
from servekit.metrics import Metrics
from servekit.registry import ModelRegistry
from servekit.settings import Address, Settings
from servekit.tls import server_context

if TYPE_CHECKING:
    from servekit.grpc.port import GrpcPort

LISTEN_BACKLOG = 65535  # connections the kernel holds for a port until they are accepted; it caps this at somaxconn
logger = logging.getLogger("servekit.server")
WORKER_EXIT_S = 5.0  # after the drain: how long workers get to exit before they are killed


def pid_file() -> Path:
    """Where a running server records its PID (per temp dir, like TorchServe's ``.model_server.pid``)."""
    return Path(tempfile.gettempdir()) / ".servekit.pid"


def check_writable(settings: Settings) -> None:
    """Stop the start with a ``ConfigError`` naming the path and the setting that moves it when servekit cannot write
    where it must (a read-only root file system; docs/deploy.md lists these paths): the snapshot folder, and a
    temporary folder for the PID file and extracted archives. ``TokenStore`` does the same for ``key_file.json``."""
    if settings.snapshots:
        folder = settings.log_location / "config"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            tempfile.TemporaryFile(dir=folder).close()
        except OSError as exc:
            raise ConfigError(
                f"cannot write snapshots in {folder.absolute()} ({exc.strerror or exc}): set LOG_LOCATION to a "
                "writable folder, or turn snapshots off (--ncs, or snapshots=false)"
            ) from None
    try:
        tempfile.gettempdir()  # the first writable of TMPDIR, /tmp, /var/tmp, /usr/tmp and the working directory
    except FileNotFoundError as exc:
        raise ConfigError(
            f"{exc.strerror}, where servekit writes its PID file and extracts .mar and .tar.gz archives: set TMPDIR "
            "to a writable folder"
        ) from None


class _Server(uvicorn.Server):
    """A uvicorn server that leaves signal handling to ``serve``, so three can share one process, and that accepts
    every connection waiting when its port is readable.

    uvloop's libuv accepts one connection per turn of the event loop. Under a flood a turn takes tens of
    milliseconds, so new connections were accepted at 20-30 a second: thousands waited in the kernel's accept queue
    (3,400-3,800 of them, measured with ``ss`` during W1's open loop at twice capacity), each with a request that
    waited unread for as long as the flood lasted, and past the listen backlog the kernel dropped new connections'
    SYNs. So each listening socket also has a reader of its own (on a duplicate of its descriptor) that accepts them
    all and hands each to the loop as uvloop's own accept would (``connect_accepted_socket``); the kernel's queue
    is as deep as it allows (``LISTEN_BACKLOG``)."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self._listeners: list[socket.socket] = []
        self._connecting: set[asyncio.Task[Any]] = set()  # connections accepted, not yet started (``_accept_all``)
        self._protocol: Callable[[], asyncio.Protocol] | None = None  # what uvicorn makes for each connection

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        config = self.config
        self._protocol = functools.partial(
            config.http_protocol_class,
            config=config,  # type: ignore[call-arg]
            server_state=self.server_state,
            app_state=self.lifespan.state,
        )
        loop = asyncio.get_running_loop()
        for server in self.servers:
            for listening in server.sockets:
                listener = socket.socket(fileno=os.dup(listening.fileno()))
                listener.setblocking(False)
                loop.add_reader(listener.fileno(), self._accept_all, loop, listener)
                self._listeners.append(listener)

    def _accept_all(self, loop: asyncio.AbstractEventLoop, listener: socket.socket) -> None:
        assert self._protocol is not None
        while True:
            try:
                connection, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # out of descriptors: what is left waits in the kernel's queue
                logger.warning("accepting a connection failed: %s", exc)
                return
            task = loop.create_task(loop.connect_accepted_socket(self._protocol, connection, ssl=self.config.ssl))
            self._connecting.add(task)
            task.add_done_callback(self._connected)

    def _connected(self, task: asyncio.Task[Any]) -> None:
        self._connecting.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:  # a TLS handshake that failed, say
            logger.debug("a connection was lost before it started: %s", exc)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        loop = asyncio.get_running_loop()
        for listener in self._listeners:  # else the duplicate keeps the port open
            loop.remove_reader(listener.fileno())
            listener.close()
        self._listeners.clear()
        await super().shutdown(sockets)


def cors_headers(settings: Settings) -> list[tuple[str, str]]:
    """The CORS headers of ``cors_allowed_origin|methods|headers``, for every response of every port (uvicorn sends
    them with each, the direct route's and its own error answers too), as TorchServe's ``sendHttpResponse`` does."""
    return [
        (name, value)
        for name, value in (
            ("access-control-allow-origin", settings.cors_allowed_origin),
            ("access-control-allow-methods", settings.cors_allowed_methods),
            ("access-control-allow-headers", settings.cors_allowed_headers),
        )
        if value
    ]


def create_grpc_ports(settings: Settings, registry: ModelRegistry, tokens: TokenStore | None) -> list[GrpcPort]:
    """TorchServe's gRPC ports with their services, not yet listening; none with ``enable_grpc=false``. grpcio and
    the generated messages are imported only then (``servekit.grpc``)."""
    if not settings.enable_grpc:
        return []
    # Before grpcio loads: the workers start by fork and exec and never use gRPC, so grpcio's fork handlers would
    # only log "skipping fork() handlers" for each worker started.
    os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
    from servekit.grpc.server import grpc_ports

    return list(grpc_ports(settings, registry, tokens).both)


async def start_grpc_ports(ports: list[GrpcPort]) -> bool:
    """Make the gRPC ports listen; ``False``, with the cause logged, when one cannot."""
    for port in ports:
        try:
            await port.start()
        except OSError as exc:
            logger.error("%s port: %s", port.name, exc)
            return False
    return True


def startup_models(settings: Settings) -> list[tuple[str | None, Path, str]]:
    """``load_models`` as (name or None, path, url) triples; ``all`` means every archive in the store."""
    store = settings.model_store
    entries: list[tuple[str | None, Path, str]] = []
    for item in settings.load_models:
        if item == "all":
            if store is None:
                raise ConfigError("load_models=all needs a model store")
            for path in sorted(store.iterdir()):
                if not path.name.startswith(".") and (path.is_dir() or path.name.endswith(ARCHIVE_SUFFIXES)):
                    entries.append((None, path, path.name))
            continue
        name, _, location = item.rpartition("=")
        if ".." in Path(location).parts:
            raise ConfigError(f"load_models: relative path is not allowed in {location!r}")
        path = Path(location) if Path(location).is_absolute() or store is None else store / location
        entries.append((name or None, path, location))
    return entries


SNAPSHOT_PARAMS = {
    "minWorkers": "initial_workers",
    "maxWorkers": "max_workers",
    "batchSize": "batch_size",
    "maxBatchDelay": "max_batch_delay",
    "responseTimeout": "response_timeout",
    "startupTimeout": "startup_timeout",
    "jobQueueSize": "job_queue_size",
}


async def load_model(
    registry: ModelRegistry, name: str | None, path: Path, url: str, params: dict[str, object] | None = None
) -> str | None:
    """Open and register one startup model; errors are logged, never fatal. Returns its version."""
    try:
        spec = await asyncio.to_thread(open_archive, path, name)
        await registry.register(spec, url, params, loaded_at_startup=True)
    except ServekitError as exc:
        logger.error("cannot load model from %s: %s", url, exc.message)
        return None
    logger.info("loaded model %s version %s from %s", spec.name, spec.version, url)
    return spec.version


async def restore_snapshot(registry: ModelRegistry, models: dict[str, dict[str, dict[str, object]]]) -> None:
    """Register every model version of a snapshot with its saved settings, then restore the defaults."""
    store = registry.settings.model_store or Path(".")
    jobs = []
    for name, versions in models.items():
        for version, entry in versions.items():
            params = {param: entry[key] for key, param in SNAPSHOT_PARAMS.items() if key in entry}
            mar = str(entry["marName"])
            jobs.append(
                (name, version, bool(entry.get("defaultVersion")), load_model(registry, name, store / mar, mar, params))
            )
    loaded = await asyncio.gather(*(job for *_, job in jobs))
    for (name, version, is_default, _), got in zip(jobs, loaded, strict=True):
        if got is not None and got != version:
            logger.error("snapshot: %s was version %s, its archive now holds version %s", name, version, got)
        if is_default and got == version:
            registry.set_default(name, version)


async def load_startup_models(registry: ModelRegistry) -> None:
    settings = registry.settings
    saved = snapshot.read(settings.log_location / "config") if settings.snapshots else None
    if saved is not None:
        logger.info("restoring %d model(s) from the snapshot; load_models/--models are ignored", len(saved))
        await restore_snapshot(registry, saved)
    else:
        await asyncio.gather(*(load_model(registry, *entry) for entry in startup_models(settings)))


async def serve_port(server: _Server) -> None:
    """One port's uvicorn server; uvicorn exits the process when it cannot bind, this returns instead (the error
    is already logged) so that ``serve`` can stop the others and clean up."""
    with contextlib.suppress(SystemExit):
        await server.serve()


async def serve(settings: Settings) -> int:
    tls_context = server_context(settings)  # a bad key or certificate stops the start here, before any port binds
    supplied = supplied_keys(settings)  # and so does bad token key material: never a fall back to no keys
    check_writable(settings)  # and a folder servekit must write to that it cannot (a read-only root file system)
    tokens = (  # writes key_file.json, or stops the start with one line saying where (before any process starts)
        None
        if settings.disable_token_authorization
        else TokenStore(Path("key_file.json"), settings.token_expiration_min, supplied)
    )

    def save_snapshot() -> None:
        if settings.snapshots and not registry.starting:
            try:
                snapshot.write(settings.log_location / "config", registry.snapshot())
            except OSError as exc:
                logger.error("cannot write the snapshot: %s", exc)

    metrics = Metrics()
    registry = ModelRegistry(settings, metrics, on_change=save_snapshot)
    if registry.forks is not None:
        registry.forks.start()  # it imports torch while the ports bind; the first worker is forked from it
    metrics.watch(registry.states)
    try:
        grpc_ports = create_grpc_ports(settings, registry, tokens)
    except ConfigError:
        if tokens is not None:
            tokens.remove()
        raise
    inference, predictions = create_inference_app(registry, metrics, tokens)  # counts and logs its responses
    apps: list[tuple[ASGIApp, Address, DirectRoute | None]] = [
        (inference, settings.inference_address, predictions),
        (
            AccessLog(create_management_app(registry, tokens), metrics, settings.access_log),
            settings.management_address,
            None,
        ),
        (AccessLog(create_metrics_app(metrics), metrics, settings.access_log), settings.metrics_address, None),
    ]
    servers = [
        _Server(
            uvicorn.Config(
                app,
                host=a.host,
                port=a.port,
                http=protocol_with(settings.http_header_timeout, settings.http_body_timeout, direct),
                lifespan="off",
                backlog=LISTEN_BACKLOG,
                access_log=False,
                proxy_headers=False,  # the access log names the peer, as TorchServe's does
                log_level="warning",
                timeout_graceful_shutdown=int(settings.drain_timeout),
                headers=[*cors_headers(settings), *NO_CACHE.items()],  # on every answer, as TorchServe's
            )
        )
        for app, a, direct in apps
    ]
    for server, (_, a, _) in zip(servers, apps, strict=True):
        if a.scheme == "https":  # uvicorn's TLS settings name files; the context is built in memory (servekit.tls)
            server.config.load()
            server.config.ssl = tls_context
    stop = asyncio.Event()

    def on_signal() -> None:
        if stop.is_set():
            logger.warning("second signal: exiting now")
            cleanup()
            os._exit(1)
        registry.draining = True
        stop.set()

    def cleanup() -> None:
        if tokens is not None:
            tokens.remove()
        with contextlib.suppress(OSError):
            if json.loads(pid_file().read_text()).get("pid") == os.getpid():
                pid_file().unlink()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    tasks = [asyncio.create_task(serve_port(s)) for s in servers]
    while not all(s.started for s in servers) and not any(t.done() for t in tasks):
        await asyncio.sleep(0.02)
    if not all(s.started for s in servers) or not await start_grpc_ports(grpc_ports):
        logger.error("could not bind the server ports")
        for s in servers:
            s.should_exit = True
        await asyncio.gather(*tasks, *(p.stop(None) for p in grpc_ports), return_exceptions=True)
        cleanup()
        return 1
    pid_file().write_text(json.dumps({"pid": os.getpid(), "inference_address": str(settings.inference_address)}))
    try:
        await load_startup_models(registry)
        registry.starting = False
        save_snapshot()
        heap.settle()
        print("Model server started.", flush=True)
        await stop.wait()
        logger.info("shutting down")
        for s in servers:
            s.should_exit = True
        drain = (p.stop(settings.drain_timeout) for p in grpc_ports)  # new calls refused, those running finish
        await asyncio.gather(*tasks, *drain, return_exceptions=True)
        await registry.close(WORKER_EXIT_S)
    finally:
        cleanup()
    return 0


def run(settings: Settings) -> int:
    """Run the server in this process until SIGTERM/SIGINT; returns the exit code."""
    logs.configure(settings.log_format)
    import uvloop

    return uvloop.run(serve(settings))
