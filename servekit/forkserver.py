"""ForkServer: the zygote (``servekit.zygote``) from the front end's side, and the workers forked from it.

A worker spawned as a fresh Python imports torch (about a second, and over 100 MB of its own memory); one forked from
the zygote, which imported it once, starts in milliseconds and shares those pages copy-on-write. ``fork`` asks the
zygote for a worker, one request at a time, and returns it as a ``ForkedProcess``, the front end's child (the
front end is a child subreaper while it waits: the zygote's intermediate child exits and the worker is adopted).
It returns ``None`` whenever the zygote cannot fork (not started yet and failing to, dead, hung, or refusing), and the
caller then spawns the worker as before: forking only ever makes a start faster, never fails it.

A zygote that dies is logged and started again after a pause (``RESTART_S``); meanwhile workers are spawned.
Workers already running are not its children and go on serving. Forking needs Linux with pidfds (5.3); elsewhere
``supported`` is false and every worker is spawned.

Runs in the front-end process (asyncio); never imports torch or the worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import itertools
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Coroutine
from pathlib import Path

import orjson

logger = logging.getLogger("servekit.forkserver")

READY_TIMEOUT_S = 120.0  # the zygote's imports (torch) on a slow disk
FORK_TIMEOUT_S = 10.0  # one fork request; past it the zygote is taken for hung and killed
RESTART_S = (1, 2, 5, 10, 30, 60)  # pauses before starting a dead zygote again; the last repeats
MAX_MESSAGE = 1 << 16
PR_SET_CHILD_SUBREAPER, PR_GET_CHILD_SUBREAPER = 36, 37


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _prctl(option: int, arg: object) -> int:
    result: int = _libc().prctl(option, arg, 0, 0, 0)
    return result


def supported() -> bool:
    """Whether workers can be forked here: Linux with pidfds and child subreapers."""
    if not sys.platform.startswith("linux") or not hasattr(os, "pidfd_open"):
        return False
    try:
        os.close(os.pidfd_open(os.getpid()))
    except OSError:
        return False
    state = ctypes.c_int(0)
    return _prctl(PR_GET_CHILD_SUBREAPER, ctypes.pointer(state)) == 0


class _Output(asyncio.StreamReaderProtocol):
    """A worker's output pipe into a ``StreamReader``; the pipe is closed at its end (uvloop keeps it open when
    ``eof_received`` answers true, as ``StreamReaderProtocol``'s does)."""

    def eof_received(self) -> bool:
        super().eof_received()
        return False


class ForkedProcess:
    """A worker forked by the zygote and adopted by the front end, with what ``servekit.process`` uses of
    ``asyncio.subprocess.Process``: ``pid``, ``returncode`` (negative: the signal), ``stdout`` (its output, stderr
    included), ``wait``, ``terminate`` and ``kill``. Its exit is seen on a pidfd and reaped at once."""

    def __init__(self, pid: int, pidfd: int, stdout: asyncio.StreamReader) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self.stdout = stdout
        self._pidfd = pidfd
        self._loop = asyncio.get_running_loop()
        self._exited: asyncio.Future[int] = self._loop.create_future()
        self._loop.add_reader(pidfd, self._reap)

    @classmethod
    async def adopt(cls, pid: int, output: int) -> ForkedProcess:
        """The front end's child ``pid``, whose output is the read end ``output`` (taken over, closed with it)."""
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            os.close(output)
            raise
        loop = asyncio.get_running_loop()
        stdout = asyncio.StreamReader(limit=2**16)
        try:
            await loop.connect_read_pipe(lambda: _Output(stdout), os.fdopen(output, "rb", 0))
        except BaseException:
            os.close(pidfd)
            raise
        return cls(pid, pidfd, stdout)

    def _reap(self) -> None:
        try:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:  # reaped by someone else: the status is lost, as asyncio reports it
            pid, status = self.pid, 255 << 8
        if pid == 0:
            return
        self._loop.remove_reader(self._pidfd)
        os.close(self._pidfd)
        self.returncode = os.waitstatus_to_exitcode(status)
        self._exited.set_result(self.returncode)

    async def wait(self) -> int:
        return await asyncio.shield(self._exited)

    def send_signal(self, sig: int) -> None:
        if self.returncode is not None:
            raise ProcessLookupError(self.pid)
        signal.pidfd_send_signal(self._pidfd, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class ForkServer:
    """The zygote: ``start`` it (in the background), ``fork`` workers from it, ``close`` it. Started again, after
    ``RESTART_S``, when it dies."""

    def __init__(self) -> None:
        self._process: asyncio.subprocess.Process | None = None
        self._control: socket.socket | None = None
        self._ready: asyncio.Future[bool] | None = None  # True once the zygote said it is ready; False if it failed
        self._lock = asyncio.Lock()  # one fork at a time: the subreaper window and the answers stay in step
        self._ids = itertools.count()
        self._failures = 0
        self._closed = False
        self._tasks: set[asyncio.Task[None]] = set()
        state = ctypes.c_int(0)
        _prctl(PR_GET_CHILD_SUBREAPER, ctypes.pointer(state))
        self._was_subreaper = bool(state.value)  # then it stays one

    def start(self) -> None:
        """Start the zygote in the background; ``fork`` waits for it to be ready."""
        if self._ready is None and not self._closed:
            self._ready = asyncio.get_running_loop().create_future()
            self._background(self._spawn(self._ready))

    def _background(self, job: Coroutine[object, object, None]) -> None:
        task = asyncio.get_running_loop().create_task(job)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _spawn(self, ready: asyncio.Future[bool]) -> None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        one = "1"  # no thread pool in the zygote: a fork copies only the thread that forks
        env = {**os.environ, "OMP_NUM_THREADS": one, "MKL_NUM_THREADS": one, "OPENBLAS_NUM_THREADS": one}
        try:
            self._process = await asyncio.create_subprocess_exec(
                *(sys.executable, "-m", "servekit.zygote", "--fd", str(child.fileno()), "--parent", str(os.getpid())),
                pass_fds=(child.fileno(),),
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
            )
        except OSError as exc:
            parent.close()
            self._lost(ready, f"cannot start it: {exc}")
            return
        finally:
            child.close()
        parent.setblocking(False)
        self._control = parent
        process = self._process
        assert process.stdout is not None
        self._background(self._relay(process.stdout, process.pid))
        loop = asyncio.get_running_loop()
        try:
            answer = orjson.loads(await asyncio.wait_for(loop.sock_recv(parent, MAX_MESSAGE), READY_TIMEOUT_S))
        except (TimeoutError, OSError, orjson.JSONDecodeError):
            answer = None
        if self._ready is not ready:
            return  # closed meanwhile
        if not isinstance(answer, dict) or answer.get("op") != "ready":
            self._lost(ready, "it did not start" if process.returncode is None else "it exited while starting")
            return
        logger.info("worker zygote started (pid %s): workers are forked from it", process.pid)
        ready.set_result(True)
        self._background(self._watch(process, ready))

    async def _relay(self, stream: asyncio.StreamReader, pid: int) -> None:
        """The zygote's own output (an import error's traceback) into the server log."""
        while line := await stream.readline():
            logger.warning("[zygote %s] %s", pid, line.decode(errors="replace").rstrip())

    async def _watch(self, process: asyncio.subprocess.Process, ready: asyncio.Future[bool]) -> None:
        code = await process.wait()
        if self._ready is ready:
            self._lost(ready, f"it exited with code {code}")

    def _lost(self, ready: asyncio.Future[bool], reason: str) -> None:
        """The zygote ``ready`` announced is gone, or never came: spawn workers meanwhile, start it again later."""
        if self._ready is not ready:
            return  # lost already
        loop = asyncio.get_running_loop()
        self._ready = resting = loop.create_future()  # until it starts again, ``fork`` answers None at once
        resting.set_result(False)
        self._drop_control()
        if self._process is not None and self._process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._process.kill()
        if not ready.done():
            ready.set_result(False)
        if self._closed:
            return
        delay = RESTART_S[min(self._failures, len(RESTART_S) - 1)]
        self._failures += 1
        logger.warning(
            "worker zygote lost (%s): workers start as fresh processes; starting it again in %ss", reason, delay
        )
        loop.call_later(delay, self._restart, resting)

    def _restart(self, resting: asyncio.Future[bool]) -> None:
        if self._ready is resting and not self._closed:
            self._ready = None
            self.start()

    async def fork(self, sock: socket.socket, env: dict[str, str], cwd: str, threads: int) -> ForkedProcess | None:
        """A worker forked from the zygote, its socket being ``sock`` (this end stays open) and its settings the
        environment, working directory and torch thread count given; ``None`` if the zygote cannot fork one now.
        Runs to its end even when the caller is cancelled, so that a forked worker is always reaped."""
        self.start()
        ready = self._ready
        if ready is None or not await asyncio.shield(ready):
            return None
        return await asyncio.shield(self._fork(ready, sock, env, cwd, threads))

    async def _fork(
        self, ready: asyncio.Future[bool], sock: socket.socket, env: dict[str, str], cwd: str, threads: int
    ) -> ForkedProcess | None:
        async with self._lock:
            control = self._control
            if self._ready is not ready or control is None:
                return None
            try:
                return await self._request_fork(control, ready, sock, env, cwd, threads)
            finally:
                if self._control is not control:  # the zygote was lost meanwhile
                    control.close()

    async def _request_fork(
        self,
        control: socket.socket,
        ready: asyncio.Future[bool],
        sock: socket.socket,
        env: dict[str, str],
        cwd: str,
        threads: int,
    ) -> ForkedProcess | None:
        """One fork request on ``control``, the socket to the zygote ``ready`` announced (see ``fork``)."""
        output, output_end = os.pipe()
        request_id = next(self._ids)
        request = {"op": "fork", "id": request_id, "env": env, "cwd": cwd, "threads": threads}
        self._subreaper(True)
        try:
            socket.send_fds(control, [orjson.dumps(request)], [sock.fileno(), output_end])
            answer = await asyncio.wait_for(self._answer(control, request_id), FORK_TIMEOUT_S)
        except (OSError, TimeoutError, orjson.JSONDecodeError, EOFError) as exc:
            os.close(output)
            self._lost(ready, f"a fork failed: {type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
            return None
        finally:
            os.close(output_end)
            self._subreaper(False)
        pid = answer.get("pid")
        if answer.get("op") != "forked" or not isinstance(pid, int):
            os.close(output)
            logger.warning("worker zygote could not fork (%s): this worker starts as a fresh process", answer)
            return None
        if parent_of(pid) != os.getpid():  # not adopted, so not reaped here: it exits, its parent not the server
            os.close(output)
            logger.warning("worker zygote: worker %s was not adopted: this worker starts as a fresh process", pid)
            return None
        self._failures = 0
        try:
            return await ForkedProcess.adopt(pid, output)
        except OSError as exc:
            logger.warning("worker zygote: cannot watch worker %s (%s): it starts as a fresh process", pid, exc)
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return None

    def _drop_control(self) -> None:
        """Forget the socket to the zygote; closed now unless a fork is using it (``_fork`` closes it then)."""
        control, self._control = self._control, None
        if control is not None and not self._lock.locked():
            control.close()

    async def _answer(self, control: socket.socket, request_id: int) -> dict[str, object]:
        loop = asyncio.get_running_loop()
        while True:
            message = await loop.sock_recv(control, MAX_MESSAGE)
            if not message:
                raise EOFError("the zygote closed its socket")
            answer = orjson.loads(message)
            if isinstance(answer, dict) and answer.get("id") == request_id:
                return answer

    def _subreaper(self, on: bool) -> None:
        """While a fork is answered the front end adopts the orphans of its descendants: the new worker, once the
        zygote's intermediate child exits. Outside that window orphans go where they went before."""
        if not self._was_subreaper:
            _prctl(PR_SET_CHILD_SUBREAPER, int(on))

    async def close(self, timeout: float = 5.0) -> None:
        """Stop the zygote (it exits once its socket closes; killed past ``timeout``); no fork after this."""
        self._closed = True
        ready, self._ready = self._ready, None
        if ready is not None and not ready.done():
            ready.set_result(False)
        for task in list(self._tasks):
            task.cancel()
        self._drop_control()
        process = self._process
        if process is not None and process.returncode is None:
            try:
                await asyncio.wait_for(process.wait(), timeout)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()


def parent_of(pid: int) -> int | None:
    """The parent's pid of ``pid`` (from /proc), or ``None`` if it is gone."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None
