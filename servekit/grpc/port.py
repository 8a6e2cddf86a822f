"""One gRPC listening port (``GrpcPort``): a ``grpc.aio`` server, the services it serves, and what every call on it
goes through: the port's key check, errors turned into statuses (``servekit.grpc.status``), and an access-log line.

A service is added with one call, ``port.add(descriptor, implementation)``: ``descriptor`` is the service's
descriptor from a generated ``*_pb2`` module, ``implementation`` an object with an ``async`` method per RPC, named as
in the ``.proto`` file, taking ``(request, context)`` (a request iterator when the client streams): a coroutine that
returns the response, or an async generator of the responses when the server streams. A method fails a call by
raising a ``ServekitError``. The handlers are built from the descriptor, so no generated ``*_pb2_grpc`` module is
needed, and the guard is bound once per method, not per call (no interceptor).

A connection may be closed after ``max_connection_age_ms`` (its calls get ``max_connection_age_grace_ms`` more), as
TorchServe's ``grpc_*_max_connection_age_ms`` keys say: the client reconnects, to another replica maybe.

The server does not share its port (``SO_REUSEPORT`` off, unlike grpcio's default: a second server on the same port
must fail to start, not take half the calls). The largest message a client may send is ``max_request_size``.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import socket
import time
from collections.abc import AsyncIterator, Callable, Collection
from typing import Any, NoReturn

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message_factory import GetMessageClass

from servekit import logs
from servekit.api.auth import TokenStore
from servekit.errors import ServekitError
from servekit.grpc.status import status_of

logger = logging.getLogger("servekit.grpc")
access_logger = logging.getLogger("servekit.access")
Context = grpc.aio.ServicerContext[Any, Any]
Behaviour = Callable[[Any, Context], Any]
_HANDLERS = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


class GrpcPort:
    """A gRPC port on ``host:port`` whose calls need a ``kind`` key of ``tokens`` (none when ``tokens`` is ``None``),
    over TLS when ``credentials`` are given."""

    def __init__(
        self,
        name: str,
        host: str,
        port: int,
        *,
        tokens: TokenStore | None,
        kind: str,
        credentials: grpc.ServerCredentials | None = None,
        max_request_size: int,
        max_connection_age_ms: int | None = None,
        max_connection_age_grace_ms: int | None = None,
        access_log: bool = True,
    ) -> None:
        self.name = name
        self.host, self.port = host, port
        self.address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.tokens = tokens
        self.kind = kind
        self.credentials = credentials
        self.access_log = access_log
        self._write: Callable[[str], None] | None = None
        options = [("grpc.so_reuseport", 0), ("grpc.max_receive_message_length", max_request_size)]
        if max_connection_age_ms is not None:
            options.append(("grpc.max_connection_age_ms", max_connection_age_ms))
        if max_connection_age_grace_ms is not None:
            options.append(("grpc.max_connection_age_grace_ms", max_connection_age_grace_ms))
        self.server = grpc.aio.server(options=options)

    def add(self, service: ServiceDescriptor, implementation: object, open_methods: Collection[str] = ()) -> None:
        """Serve ``service`` with ``implementation``'s methods; those named in ``open_methods`` need no key."""
        handlers = {}
        for method in service.methods:
            request, response = GetMessageClass(method.input_type), GetMessageClass(method.output_type)
            behaviour = self._guard(
                getattr(implementation, method.name), f"{service.full_name}/{method.name}", method.name in open_methods
            )
            make = _HANDLERS[method.client_streaming, method.server_streaming]
            handlers[method.name] = make(
                behaviour, request_deserializer=request.FromString, response_serializer=response.SerializeToString
            )
        self.server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(service.full_name, handlers)])

    async def start(self) -> None:
        """Bind and listen; ``OSError`` when the address cannot be bound."""
        try:
            if self.credentials is None:
                bound = self.server.add_insecure_port(self.address)
            else:
                bound = self.server.add_secure_port(self.address, self.credentials)
        except RuntimeError:  # grpcio raises this (older releases return 0) without saying why
            bound = 0
        if not bound:
            raise OSError(f"cannot listen on {self.address}: {_bind_error(self.host, self.port)}")
        await self.server.start()

    async def stop(self, grace: float | None) -> None:
        """Refuse new calls at once; those in progress get ``grace`` seconds, then they are cancelled."""
        await self.server.stop(grace)

    def _guard(self, behaviour: Behaviour, method: str, open_method: bool) -> Behaviour:
        """``behaviour`` behind the key check, the error statuses and the access log."""
        checked = self.tokens is not None and not open_method

        async def fail(context: Context, error: Exception, call: _Call) -> NoReturn:
            if isinstance(error, ServekitError):
                call.code, message = status_of(error)
            else:
                logger.error("unexpected error serving %s", method, exc_info=error)
                call.code, message = grpc.StatusCode.INTERNAL, "Internal server error"
            await context.abort(call.code, message)

        if inspect.isasyncgenfunction(behaviour):

            async def streamed(request: Any, context: Context) -> AsyncIterator[Any]:
                call = _Call(context.peer())
                try:
                    if checked:
                        self._authorize(context)
                    async for response in behaviour(request, context):
                        yield response
                except (asyncio.CancelledError, GeneratorExit):  # GeneratorExit: closed before its last response
                    call.code = grpc.StatusCode.CANCELLED
                    raise
                except grpc.aio.AbortError:
                    raise
                except Exception as exc:
                    await fail(context, exc, call)
                finally:
                    self._log(method, call)

            return streamed

        async def unary(request: Any, context: Context) -> Any:
            call = _Call(context.peer())
            try:
                if checked:
                    self._authorize(context)
                return await behaviour(request, context)
            except asyncio.CancelledError:
                call.code = grpc.StatusCode.CANCELLED
                raise
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                await fail(context, exc, call)
            finally:
                self._log(method, call)

        return unary

    def _authorize(self, context: Context) -> None:
        """Raise ``UnauthorizedError``/``ForbiddenError`` unless the call's ``authorization`` metadata carries a
        valid key of the port's kind (``Bearer <key>``, as over HTTP)."""
        assert self.tokens is not None
        key = next((str(v) for k, v in context.invocation_metadata() or () if k == "authorization"), None)
        self.tokens.check(self.kind, key)

    def _log(self, method: str, call: _Call) -> None:
        """TorchServe's access-log line for a gRPC call: ``/<ip>:<port> "gRPC <method> HTTP/2.0" <code> <ms>``."""
        if not self.access_log:
            return
        if self._write is None:  # resolved at the first line: logging is set up after the ports are built
            self._write = logs.info_writer(access_logger) or access_logger.info
        peer = call.peer.partition(":")[2]  # "ipv4:127.0.0.1:5000", "ipv6:[::1]:5000"
        elapsed_ms = (time.perf_counter() - call.start) * 1000
        self._write(f'/{peer} "gRPC {method} HTTP/2.0" {call.code.value[0]} {elapsed_ms:.2f}ms')


def _bind_error(host: str, port: int) -> str:
    """Why ``host:port`` cannot be bound ("Address already in use"), found by binding it: grpcio does not say."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.bind((host, port))
    except OSError as exc:
        return exc.strerror or str(exc)
    return "grpcio could not bind it"


class _Call:
    """How a call ended, for its access-log line. The peer is read when the call starts: grpcio's aio server frees the
    core call (``rpc_state.call = NULL``) once the call's task has ended, and a streaming method left suspended at a
    ``yield`` (the client cancelled while grpcio was sending a response) is closed later, by the event loop's
    async-generator finalizer; ``context.peer()`` there dereferences NULL and the process dies of SIGSEGV."""

    __slots__ = ("code", "peer", "start")

    def __init__(self, peer: str) -> None:
        self.code = grpc.StatusCode.OK
        self.peer = peer
        self.start = time.perf_counter()
