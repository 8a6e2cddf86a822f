"""The front end's listening sockets: every connection waiting to be accepted is accepted in the same turn of the
event loop, however long its turns (uvloop's libuv alone accepts one per turn, so under a flood thousands waited,
their requests unread); and a port that shuts down stops listening. A servekit port (``servekit.server._Server``)
in process, on uvloop, with a loop kept busy by a callback that blocks it for a while every turn."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

import uvicorn
import uvloop

from servekit.server import _Server

WAITING = 100  # connections made while the loop is blocked
TURN_S = 0.2  # how long each busy turn blocks the loop
TURNS = 5


Receive = Callable[[], Awaitable[Any]]
Send = Callable[[Any], Awaitable[None]]


async def app(scope: dict[str, Any], receive: Receive, send: Send) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


async def started_port() -> tuple[_Server, asyncio.Task[None], int]:
    config = uvicorn.Config(app, host="127.0.0.1", port=0, lifespan="off", log_level="warning")
    config.timeout_graceful_shutdown = 1
    server = _Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        assert not task.done(), "the port did not start"
        await asyncio.sleep(0.01)
    return server, task, server.servers[0].sockets[0].getsockname()[1]


def test_accept_takes_every_waiting_connection_in_one_turn_of_a_busy_loop() -> None:
    async def scenario() -> None:
        server, task, port = await started_port()
        loop = asyncio.get_running_loop()
        clients: list[socket.socket] = []
        seen: list[int] = []
        done = loop.create_future()

        def busy(turn: int) -> None:
            if turn == 0:  # the connections arrive while the loop is blocked: all wait in the kernel's queue
                for _ in range(WAITING):
                    clients.append(socket.create_connection(("127.0.0.1", port)))
            time.sleep(TURN_S)
            seen.append(len(server.server_state.connections))
            if turn + 1 < TURNS:
                loop.call_soon(busy, turn + 1)
            else:
                done.set_result(None)

        loop.call_soon(busy, 0)
        try:
            await done
        finally:
            for client in clients:
                client.close()
            server.should_exit = True
            await task
        # one accept per turn would have taken fewer than TURNS of them by now
        assert seen[-1] >= WAITING, f"connections accepted, turn by turn: {seen}"

    uvloop.run(asyncio.wait_for(scenario(), 30))


def test_accept_a_port_that_shut_down_no_longer_listens() -> None:
    async def scenario() -> int:
        server, task, port = await started_port()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        assert (await reader.readline()).startswith(b"HTTP/1.1 200")
        writer.close()
        server.should_exit = True
        await task
        return port

    port = uvloop.run(asyncio.wait_for(scenario(), 30))
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return
    raise AssertionError("the port still accepts connections after its server shut down")
