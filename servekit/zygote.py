"""The zygote: a process that imports torch and the worker code once, and forks workers that start from there.

Started by the front end (``servekit.forkserver``) as ``python -m servekit.zygote --fd N --parent PID``, N being its
end of a ``SOCK_SEQPACKET`` socket pair. It imports torch with every thread pool at one thread (the front end sets
``OMP_NUM_THREADS``, ``MKL_NUM_THREADS`` and ``OPENBLAS_NUM_THREADS`` to 1 for it), never runs a torch op and never
touches CUDA, so it stays single-threaded and CUDA-free: what a fork needs (``forkable``). Its heap is then frozen
(``gc.freeze``), so that no collection writes to the pages the workers share with it (copy-on-write).

It answers one ``fork`` message at a time; each carries the worker's environment, working directory and torch
thread count, and two descriptors (``SCM_RIGHTS``): the worker's end of its socket pair and its output pipe. The
zygote forks an intermediate child, which forks the worker and exits at once; the front end, a child subreaper while
it waits for the answer, adopts the worker. So a forked worker is the front end's child as a spawned one is: the
front end reaps it and gets its exit status, and its death signal (``servekit.worker.die_with_parent``) names the
front end, not the zygote, whose death does not touch the workers. The answer is ``forked`` with the worker's pid,
or ``failed`` with the reason (the front end then spawns the worker as a fresh Python).

The worker takes its settings (``become_worker``) and runs ``servekit.worker.main`` to its exit code, as
``python -m servekit.worker`` would, and shows as that in ``/proc/PID/cmdline``. The zygote exits when the front end
closes the socket, and dies with the front end (its own death signal).

Runs in the zygote and in the workers forked from it; never imports asyncio.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import functools
import gc
import os
import signal
import socket
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from servekit import worker

MAX_MESSAGE = 1 << 20  # one fork request: the environment is most of it
PID = struct.Struct("=i")
ENTRY = sys.path[0]  # what ``python -m`` put first on sys.path: the working directory the zygote started in
# OpenBLAS's thread count setter, by the names its builds export (numpy's wheels: scipy_openblas, 64-bit integers)
BLAS_SETTERS = [
    f"{prefix}_set_num_threads{suffix}" for prefix in ("openblas", "scipy_openblas") for suffix in ("", "64_", "_64_")
]


def preload() -> None:
    """Import what every worker imports (torch, when installed; the worker code is imported with this module), then
    freeze the heap: the collector then never visits, so never writes to, the objects the workers share."""
    with contextlib.suppress(ImportError):
        import torch  # noqa: F401
    gc.collect()
    gc.freeze()


def forkable() -> str | None:
    """Why this process must not fork now: a thread besides this one (a fork copies only the caller, and a lock
    another thread held stays held in the child), or CUDA initialised (a forked child cannot use it)."""
    threads = len(os.listdir("/proc/self/task"))
    if threads > 1:
        return f"the zygote runs {threads} threads"
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        return "the zygote has initialised CUDA"
    return None


def fork_worker(request: dict[str, Any], fds: list[int], control_fd: int, parent: int) -> int | Callable[[], int]:
    """Fork a worker through an intermediate child (see the module's docstring). In the zygote: the worker's pid,
    once the intermediate child is reaped (the worker is adopted by then). In the worker: its run, which the caller
    calls outside every frame of the zygote's loop. Raises ``OSError`` or ``RuntimeError`` in the zygote."""
    reason = forkable()
    if reason is not None:
        raise RuntimeError(reason)
    sock_fd, out_fd = fds
    read_end, write_end = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        intermediate = os.fork()
    except OSError:
        os.close(read_end)
        os.close(write_end)
        raise
    if intermediate == 0:
        me = os.getpid()
        try:
            show_as_worker()  # before the fork: the worker shows as one from its first moment as the front end's child
            pid = os.fork()
            if pid == 0:
                os.close(read_end)
                os.close(write_end)
                return functools.partial(become_worker, request, sock_fd, out_fd, control_fd, parent, me)
            os.write(write_end, PID.pack(pid))
        except BaseException:
            os._exit(1)  # never back into the zygote's loop: the zygote sees no pid and answers ``failed``
        os._exit(0)
    os.close(write_end)
    try:
        answer = b""
        while chunk := os.read(read_end, PID.size - len(answer)):
            answer += chunk
            if len(answer) == PID.size:
                break
    finally:
        os.close(read_end)
        os.waitpid(intermediate, 0)
    if len(answer) != PID.size:
        raise RuntimeError("the intermediate process exited before it forked the worker")
    (pid,) = PID.unpack(answer)
    return int(pid)


def become_worker(request: dict[str, Any], sock_fd: int, out_fd: int, fd: int, parent: int, intermediate: int) -> int:
    """In a forked worker: take the worker's settings, as a spawned worker starts with them, then run it. Its socket
    takes ``fd``, the number of the zygote's socket (closed in this process by then), so that its arguments, as
    ``/proc/PID/cmdline`` shows them (``show_as_worker``), are right."""
    os.dup2(sock_fd, fd)
    os.close(sock_fd)
    os.dup2(out_fd, 1)
    os.dup2(out_fd, 2)
    os.close(out_fd)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # the zygote ignores it; a spawned worker does not
    os.environ.clear()
    os.environ.update(request["env"])
    os.chdir(request["cwd"])
    if sys.path and sys.path[0] == ENTRY:
        sys.path[0] = request["cwd"]  # python -m puts the working directory first
    args = ["--fd", str(fd), "--parent", str(parent)]
    sys.argv = [str(worker.__file__), *args]
    threads = int(request["threads"])
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(threads)  # what OMP_NUM_THREADS sets in a spawned worker
    set_blas_threads(threads)
    while os.getppid() == intermediate:  # until the intermediate process has exited and the front end adopted this
        time.sleep(0.0002)
    return worker.main(args)


def set_blas_threads(threads: int) -> None:
    """Give OpenBLAS (numpy's, loaded at one thread by torch's import in the zygote) the threads it has in a spawned
    worker: ``OPENBLAS_NUM_THREADS`` or ``GOTO_NUM_THREADS`` when set, else ``threads`` (``OMP_NUM_THREADS``)."""
    wanted = os.environ.get("OPENBLAS_NUM_THREADS") or os.environ.get("GOTO_NUM_THREADS") or ""
    threads = int(wanted) if wanted.isdigit() else threads
    if threads <= 1:
        return
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return
    libraries = {line.split(maxsplit=5)[-1] for line in maps.splitlines() if "openblas" in line.rsplit("/", 1)[-1]}
    for library in libraries:
        with contextlib.suppress(OSError):
            setters = [getattr(ctypes.CDLL(library), name, None) for name in BLAS_SETTERS]
            for setter in setters:
                if setter is not None:
                    setter(threads)
                    break


def show_as_worker() -> None:
    """Rewrite ``servekit.zygote`` as ``servekit.worker`` in this process's arguments, in place, where the kernel
    reads ``/proc/PID/cmdline`` (as ``setproctitle`` does), so that ``ps`` and ``pgrep`` show a forked worker as
    ``python -m servekit.worker --fd N --parent PID``, as a spawned one; the two names are as long. Nothing happens
    where the arguments cannot be found."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        start, end = int(fields[45]), int(fields[46])  # arg_start, arg_end (fields 48 and 49 of proc(5))
        offset = ctypes.string_at(start, end - start).find(b"\0servekit.zygote\0") if start else -1
    except (OSError, IndexError, ValueError):
        return
    if offset >= 0:
        ctypes.memmove(start + offset + len(b"\0servekit."), b"worker", len(b"worker"))


def serve(control: socket.socket, parent: int) -> Callable[[], int] | None:
    """Answer fork requests until the front end closes the socket (``None``). In a forked worker this returns the
    worker's run instead."""
    control.send(orjson.dumps({"op": "ready", "pid": os.getpid()}))
    while True:
        try:
            message, fds, _, _ = socket.recv_fds(control, MAX_MESSAGE, 2)
        except ConnectionError:
            return None
        if not message:
            return None
        request: dict[str, Any] = {}
        try:
            request = orjson.loads(message)
            if len(fds) != 2:
                raise RuntimeError(f"a fork request with {len(fds)} descriptors instead of 2")
            outcome = fork_worker(request, fds, control.fileno(), parent)
        except (OSError, RuntimeError, ValueError, KeyError, TypeError) as exc:
            answer = {"op": "failed", "id": request.get("id"), "error": f"{type(exc).__name__}: {exc}"}
        else:
            if callable(outcome):
                return outcome
            answer = {"op": "forked", "id": request["id"], "pid": outcome}
        for fd in fds:
            os.close(fd)
        try:
            control.send(orjson.dumps(answer))
        except ConnectionError:
            return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="servekit.zygote")
    parser.add_argument("--fd", type=int, required=True, help="this end of the SOCK_SEQPACKET socket pair")
    parser.add_argument("--parent", type=int, required=True, help="the front end's pid")
    args = parser.parse_args(argv)
    os.closerange(3, args.fd)  # what the front end's event loop let through: the workers would hold it too
    os.closerange(args.fd + 1, os.sysconf("SC_OPEN_MAX"))
    worker.die_with_parent()
    if os.getppid() != args.parent:  # the front end died before the line above took effect
        return 0
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the process group: the front end decides
    preload()
    with socket.socket(fileno=args.fd) as control:
        run = serve(control, args.parent)
    return 0 if run is None else run()  # in a forked worker, with the zygote's socket closed


if __name__ == "__main__":
    sys.exit(main())
