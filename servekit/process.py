"""WorkerProcess: one worker process and the socket pair to it, from the front end's side.

The process is ``python -m servekit.worker --fd N``, forked from the zygote when there is one (``PoolSettings.forks``,
``servekit.forkserver``), else spawned; it loads the model when sent a ``LoadCommand`` and runs one batch per frame.
Every frame from it is checked (``protocol.decode``) and bounded in size; a malformed or oversized frame, an early
exit or a missed ``response_timeout`` make it dead, and the error says why. Its stdout and stderr go to the server
log under its name; a watcher notices when it exits on its own. Forked or spawned, it is the front end's child.

Runs in the front-end process (asyncio); never imports the handler or torch.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path

from servekit import protocol
from servekit.errors import HandlerError, ProtocolError, ResponseTimeoutError, ServekitError, WorkerDiedError
from servekit.forkserver import ForkedProcess, ForkServer
from servekit.inputs import InputCheck

logger = logging.getLogger("servekit.process")

FRAME_OVERHEAD = 1 << 20  # headers and JSON around the payloads of one response frame
_ids = itertools.count(9000)  # worker ids as TorchServe numbers them


OnChunks = Callable[[list[tuple[int, protocol.Response]]], None]


@dataclass(frozen=True, slots=True)
class PoolSettings:
    response_timeout: float
    startup_timeout: float
    max_response_size: int
    gpu_ids: tuple[int, ...] = ()  # round-robin over these; empty = CPU
    forks: ForkServer | None = None  # where workers are forked from; None, or when it cannot: spawned


class WorkerProcess:
    """One worker process and the socket to it."""

    def __init__(
        self,
        command: protocol.LoadCommand,
        settings: PoolSettings,
        on_exit: Callable[[WorkerProcess], None] = lambda worker: None,
    ) -> None:
        self.id = str(next(_ids))
        self._on_exit = on_exit
        self._watcher: asyncio.Task[None] | None = None
        self._output: asyncio.Task[None] | None = None
        self.command = command
        self.settings = settings
        self.start_time = time.time()
        self.status = "STARTING"
        self.retiring = False
        self.process: asyncio.subprocess.Process | ForkedProcess | None = None
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self.input_check: InputCheck | None = None  # the handler's declared input, once loaded

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    @property
    def gpu_id(self) -> int | None:
        return self.command.gpu_id

    def memory_usage(self) -> int:
        """Resident set size in bytes (0 once the process is gone)."""
        try:
            pages = int(Path(f"/proc/{self.pid}/statm").read_text().split()[1])
        except (OSError, IndexError, ValueError):
            return 0
        return pages * os.sysconf("SC_PAGE_SIZE")

    async def start(self) -> None:
        """Fork or spawn the process and load the model; raises ``HandlerError`` if the load fails."""
        threads = str(self.command.torch_threads)  # torch reads these at import: no oversubscribed cores
        env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
        parent = None if self.settings.forks is None else await self._fork(self.settings.forks, env)
        if parent is None:
            parent = await self._spawn(env)
        assert self.process is not None and self.process.stdout is not None
        self._output = asyncio.get_running_loop().create_task(self._relay_output(self.process.stdout))
        self._reader, self._writer = await asyncio.open_unix_connection(sock=parent, limit=2**20)
        try:
            await self._send(protocol.encode_load(self.command))
            header, _ = await asyncio.wait_for(self._receive(1), self.settings.startup_timeout)
        except TimeoutError:
            await self.kill()
            raise HandlerError(
                f"Worker for model {self.command.model_name} did not load within "
                f"startup_timeout={self.settings.startup_timeout:g}s"
            ) from None
        except (ProtocolError, asyncio.IncompleteReadError, ConnectionError):
            code = await self.kill()
            raise HandlerError(
                f"Worker for model {self.command.model_name} exited while loading ({describe_exit(code)})"
            ) from None
        if header.get("op") == "failure":
            failure = protocol.decode_failure(header)
            if failure.traceback:
                logger.error("worker %s could not load the model:\n%s", self.name, failure.traceback)
            await self.kill()
            raise HandlerError(f"Failed to load model {self.command.model_name}: {failure.kind}: {failure.message}")
        if header.get("input_schema") is not None:
            try:
                self.input_check = InputCheck(header["input_schema"])
            except HandlerError as exc:
                await self.kill()
                raise HandlerError(f"Failed to load model {self.command.model_name}: {exc.message}") from None
        self.status = "READY"
        self._watcher = asyncio.get_running_loop().create_task(self._watch())

    async def _fork(self, forks: ForkServer, env: dict[str, str]) -> socket.socket | None:
        """Fork the process from the zygote; ``None`` when it cannot (the caller spawns it then)."""
        parent, child = socket.socketpair()
        try:
            self.process = await forks.fork(child, env, self.command.model_dir, self.command.torch_threads)
        except BaseException:
            parent.close()
            raise
        finally:
            child.close()
        if self.process is None:
            parent.close()  # a worker forked before the zygote failed sees its socket close, and exits
            return None
        return parent

    async def _spawn(self, env: dict[str, str]) -> socket.socket:
        """Spawn the process as a fresh Python."""
        parent, child = socket.socketpair()
        try:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "servekit.worker",
                "--fd",
                str(child.fileno()),
                "--parent",
                str(os.getpid()),
                pass_fds=(child.fileno(),),
                cwd=self.command.model_dir,
                env=env,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
            )
        except BaseException:
            parent.close()
            raise
        finally:
            child.close()
        return parent

    @property
    def name(self) -> str:
        return f"W-{self.id}-{self.command.model_name}"

    async def _relay_output(self, stream: asyncio.StreamReader) -> None:
        """The worker's stdout and stderr (handler prints, tracebacks) into the server log, line by line."""
        worker_log = logging.getLogger("servekit.worker")
        while True:
            try:
                line = await stream.readline()
            except ValueError:  # a line over the stream's limit: pass on what is buffered
                line = await stream.read(2**16)
            if not line:
                return
            worker_log.info("[%s] %s", self.name, line.decode(errors="replace").rstrip(), extra={"worker": self.name})

    async def _watch(self) -> None:
        """Notice a worker that exits on its own (crash, OOM kill) even while it is idle."""
        assert self.process is not None
        code = await self.process.wait()
        if self.status == "READY":
            self.status = "UNLOADING"
            if self._writer is not None:
                self._writer.close()
            logger.warning("worker %s of %s exited: %s", self.id, self.command.model_name, describe_exit(code))
            self._on_exit(self)

    def send_batch(self, requests: list[protocol.Request]) -> None:
        """Hand the worker a batch (one write, no wait); ``receive_batch`` then waits for its answers, in the order
        the batches were sent. A worker runs one batch at a time; the next may wait in the socket meanwhile."""
        assert self._writer is not None
        self._writer.write(b"".join(protocol.encode_batch(requests)))

    def send_describe(self, request: protocol.Request) -> None:
        """Hand an idle worker a describe request; ``receive_batch(1)`` then waits for its answer."""
        assert self._writer is not None
        self._writer.write(b"".join(protocol.encode_describe(request)))

    async def receive_batch(self, n_requests: int, on_chunks: OnChunks | None = None) -> protocol.BatchResult:
        """The result of the batch of ``n_requests`` sent last; raises ``WorkerDiedError``/``ResponseTimeoutError``
        after which the worker is dead (``_lose``). Chunks of streamed responses go to ``on_chunks`` as they come;
        ``response_timeout`` bounds the wait for each frame."""
        try:
            while True:
                header, parts = await self._frame(n_requests)
                if header.get("op") != "partial":
                    return protocol.decode_result(header, parts, n_requests)
                if on_chunks is None:
                    raise ProtocolError("streamed chunks where none were expected")
                on_chunks(protocol.decode_partial(header, parts, n_requests))
        except (TimeoutError, ProtocolError, asyncio.IncompleteReadError, ConnectionError) as exc:
            raise await self._lose(exc) from None

    def send_drop(self, request_ids: list[str]) -> None:
        """Ask the worker (continuous batching) to drop these requests at its next iteration."""
        assert self._writer is not None
        self._writer.write(b"".join(protocol.encode_drop(request_ids)))

    async def receive_step(self, running: Collection[str]) -> protocol.Step:
        """The next step of a worker under continuous batching whose requests in flight are ``running``; raises
        ``WorkerDiedError``/``ResponseTimeoutError`` as ``receive_batch`` does (``response_timeout`` bounds each
        iteration), after which the worker is dead."""
        try:
            header, parts = await self._frame(max(1, len(running)))
            return protocol.decode_step(header, parts, running)
        except (TimeoutError, ProtocolError, asyncio.IncompleteReadError, ConnectionError) as exc:
            raise await self._lose(exc) from None

    async def _frame(self, n_requests: int) -> tuple[dict[str, object], list[memoryview]]:
        """The next frame, within ``response_timeout``."""
        async with asyncio.timeout(self.settings.response_timeout):  # no extra task, unlike wait_for
            return await self._receive(n_requests)

    async def _lose(self, exc: BaseException) -> ServekitError:
        """Kill the worker after what broke its answer (a missed ``response_timeout``, a malformed frame, a closed
        socket) and return the error its batch fails with: the one place a receive turns into a death."""
        code = await self.kill()
        model = self.command.model_name
        if isinstance(exc, TimeoutError):
            return ResponseTimeoutError(
                f"Model {model} did not answer within response_timeout={self.settings.response_timeout:g}s;"
                " its worker was restarted"
            )
        reason = str(exc) if isinstance(exc, ProtocolError) else describe_exit(code)
        return WorkerDiedError(f"Worker died while running model {model}: {reason}")

    async def _send(self, buffers: list[bytes | bytearray | memoryview]) -> None:
        assert self._writer is not None
        self._writer.write(b"".join(buffers))  # one send: a small frame in pieces costs a system call each
        await self._writer.drain()

    async def _receive(self, n_requests: int) -> tuple[dict[str, object], list[memoryview]]:
        assert self._reader is not None
        (total,) = protocol.LENGTH.unpack(await self._reader.readexactly(protocol.LENGTH.size))
        limit = self.settings.max_response_size * n_requests + FRAME_OVERHEAD
        if total > limit:
            raise ProtocolError(f"frame of {total} bytes exceeds the limit of {limit}")
        return protocol.decode(await self._reader.readexactly(total))

    async def stop(self, timeout: float = 5.0) -> bool:
        """Close the socket (the worker exits once its batch is done), then TERM and KILL if it lingers past
        ``timeout``. Returns whether it exited by itself in time."""
        self.status = "UNLOADING"
        if self._writer is not None:
            self._writer.close()
        if self.process is None or self.process.returncode is not None:
            return True
        try:
            await asyncio.wait_for(self.process.wait(), timeout)
        except TimeoutError:
            await self.kill()
            return False
        return True

    async def kill(self) -> int | None:
        """Terminate now and reap; returns the exit code (negative: the signal)."""
        self.status = "UNLOADING"
        if self._writer is not None:
            self._writer.close()
        if self.process is None:
            return None
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.terminate()
            try:
                await asyncio.wait_for(self.process.wait(), 2.0)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self.process.kill()
                await self.process.wait()
        return self.process.returncode


def describe_exit(code: int | None) -> str:
    if code is None:
        return "no process"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"
