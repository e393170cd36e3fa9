"""The node side of the gRPC transport: a :class:`~jumpstarter.node.server.NodeServer`
served to clients on other machines (``jmp node serve``).

Each client connection is a :class:`~jumpstarter.node.dispatch.NodeConnection`, made by the
handshake and named by the ``jmp-connection`` metadata of every later call. A
connection not heard of for the keep-alive time is closed: its lease is released, its
tasks run on.
"""

from __future__ import annotations

import asyncio
import errno
import hmac
import logging
import socket
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator, Mapping
from contextlib import aclosing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
from jumpstarter.errors import ConfigError
from jumpstarter.node import NodeConnection, NodeServer
from jumpstarter_protocol import (
    CloseInput,
    ConnectionInfo,
    Error,
    ErrorCode,
    GetFile,
    InitializeConnection,
    OutputChunk,
    ProtocolError,
    ReadOutput,
    ResizeTerminal,
    WriteInput,
    decode,
    encode,
)

from ._wire import (
    CONNECTION_KEY,
    DEFAULT_KEEPALIVE,
    DEFAULT_PORT,
    GET_FILE_METHOD,
    INPUT_METHOD,
    KEEPALIVE_KEY,
    PUT_FILE_METHOD,
    READ_OUTPUT_METHOD,
    REQUEST_METHOD,
    SERVICE,
    TOKEN_KEY,
    UNKNOWN_CONNECTION,
    grpc,
    server_options,
)

log = logging.getLogger(__name__)

TOKEN_REFUSED = "invalid or missing token"
STOP_GRACE = 2.0
"""Seconds calls in flight get to finish when the node stops."""
READ_AHEAD = 16
"""Output messages read ahead of what gRPC has sent, at most."""
MERGE_UP_TO = 8 * 1024 * 1024
"""Output chunks are merged into chunks of at most this many bytes: gRPC's cost per
message is such that 8 MiB frames stream about twice as fast as 1 MiB ones."""
SMALL_CHUNK = 64 * 1024
SMALL_CHUNK_WAIT = 0.002
"""Seconds a small output chunk waits for more to send with it."""
_END = object()


@dataclass
class _Client:
    connection: NodeConnection
    last_seen: float
    calls: int = 0


class NodeService:
    """The ``jumpstarter.v1.Node`` service of one node server."""

    def __init__(self, server: NodeServer, keepalive: float = DEFAULT_KEEPALIVE) -> None:
        self.server = server
        self.keepalive = keepalive
        self.clients: dict[str, _Client] = {}
        self._refused = encode(Error(code=ErrorCode.UNAUTHORIZED, message=TOKEN_REFUSED))
        self._token = server.token.encode() if server.token is not None else None
        # Leave room for the header within the node's message size limit.
        self.merge_up_to = min(MERGE_UP_TO, server.max_message_size // 2)

    def handler(self) -> grpc.GenericRpcHandler:
        # No serializers: requests and replies are the codec's frames, as bytes.
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                REQUEST_METHOD: grpc.unary_unary_rpc_method_handler(self.request),
                READ_OUTPUT_METHOD: grpc.unary_stream_rpc_method_handler(self.read_output),
                PUT_FILE_METHOD: grpc.stream_unary_rpc_method_handler(self.put_file),
                GET_FILE_METHOD: grpc.unary_stream_rpc_method_handler(self.get_file),
                INPUT_METHOD: grpc.stream_stream_rpc_method_handler(self.input),
            },
        )

    # --- the two methods ----------------------------------------------------------------

    async def request(self, data: bytes, context: grpc.aio.ServicerContext) -> bytes:
        """One request frame in, one reply frame out."""
        if not self._authorized(context):
            return self._refused
        try:
            message = decode(data, max_size=self.server.max_message_size)
        except ProtocolError as exc:
            return encode(Error(code=ErrorCode(exc.code), message=str(exc)))
        if isinstance(message, InitializeConnection):
            return await self._initialize(message, context)
        client = await self._client(context)
        with self._in_call(client):
            reply = await client.connection.handle(message)
        return self._encode(reply)

    async def read_output(
        self, data: bytes, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        """One ``ReadOutput`` frame in; output chunks, then ``OutputEnd`` or ``Error``."""
        if not self._authorized(context):
            yield self._refused
            return
        try:
            request = decode(data, max_size=self.server.max_message_size)
        except ProtocolError as exc:
            yield encode(Error(code=ErrorCode(exc.code), message=str(exc)))
            return
        if not isinstance(request, ReadOutput):
            yield encode(
                Error(code=ErrorCode.BAD_REQUEST, message=f"{request.type} is not read_output")
            )
            return
        client = await self._client(context)
        # A terminal's output is for a person at a keyboard: each echo goes at once.
        wait = 0.0 if self.server.tasks.has_terminal(request.task_id) else SMALL_CHUNK_WAIT
        with self._in_call(client):
            async for frame in self._frames(client.connection.read_output(request), wait):
                yield frame

    # --- files ----------------------------------------------------------------------------

    async def put_file(self, frames: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> bytes:
        """A ``PutFile`` frame, chunks and a ``FileEnd`` in; ``FileWritten`` or ``Error`` out.
        A client that goes away mid-stream leaves what arrived for its resume."""
        if not self._authorized(context):
            return self._refused
        max_size = self.server.max_message_size
        stream = frames.__aiter__()
        try:
            header = decode(await stream.__anext__(), max_size=max_size)
        except StopAsyncIteration:
            return encode(Error(code=ErrorCode.BAD_REQUEST, message="an empty upload stream"))
        except ProtocolError as exc:
            return encode(Error(code=ErrorCode(exc.code), message=str(exc)))

        async def messages() -> AsyncIterator[Any]:
            async for data in stream:
                yield decode(data, max_size=max_size)

        client = await self._client(context)
        with self._in_call(client):
            reply = await client.connection.put_file(header, messages())
        return self._encode(reply)

    async def get_file(self, data: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        """One ``GetFile`` frame in; file chunks, then ``FileEnd`` or ``Error``."""
        if not self._authorized(context):
            yield self._refused
            return
        try:
            request = decode(data, max_size=self.server.max_message_size)
        except ProtocolError as exc:
            yield encode(Error(code=ErrorCode(exc.code), message=str(exc)))
            return
        if not isinstance(request, GetFile):
            yield encode(Error(code=ErrorCode.BAD_REQUEST, message=f"{request.type} is not get_file"))
            return
        client = await self._client(context)
        with self._in_call(client):
            async with aclosing(client.connection.get_file(request)) as messages:
                async for message in messages:
                    yield self._encode(message)

    # --- input and terminals ----------------------------------------------------------------

    async def input(
        self, frames: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        """Input frames in (``WriteInput``, ``CloseInput``, ``ResizeTerminal``), one
        reply frame out for each."""
        if not self._authorized(context):
            yield self._refused
            return
        client = await self._client(context)
        with self._in_call(client):
            async for data in frames:
                try:
                    message = decode(data, max_size=self.server.max_message_size)
                except ProtocolError as exc:
                    yield encode(Error(code=ErrorCode(exc.code), message=str(exc)))
                    continue
                if not isinstance(message, (WriteInput, CloseInput, ResizeTerminal)):
                    yield encode(
                        Error(code=ErrorCode.BAD_REQUEST, message=f"{message.type} is not task input")
                    )
                    continue
                client.last_seen = time.monotonic()
                yield self._encode(await client.connection.handle(message))

    async def _frames(
        self, messages: AsyncGenerator[Any, None], small_chunk_wait: float = SMALL_CHUNK_WAIT
    ) -> AsyncIterator[bytes]:
        """``messages`` as frames, small output chunks merged into larger ones.

        A task writing fast wakes the reader for every write, and each message costs
        gRPC far more than its bytes do; so the messages are read ahead by a task of
        their own, what has piled up while gRPC sent the last frame goes as one, and a
        small chunk waits a moment (``SMALL_CHUNK_WAIT``) for more to go with it."""
        queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=READ_AHEAD)

        async def read_ahead() -> None:
            try:
                async with aclosing(messages):  # its files close when the client goes
                    async for message in messages:
                        await queue.put(message)
                await queue.put(_END)
            except Exception as exc:  # handed to the sending side, which raises it
                await queue.put(exc)

        reader = asyncio.get_running_loop().create_task(read_ahead())
        try:
            held = None
            while True:
                message = held if held is not None else await queue.get()
                held = None
                if message is _END:
                    return
                if isinstance(message, Exception):
                    raise message
                if not isinstance(message, OutputChunk):
                    yield self._encode(message)
                    continue
                parts, size = [message.data], len(message.data)
                while size < self.merge_up_to:
                    if not queue.empty():
                        after = queue.get_nowait()
                    elif size < SMALL_CHUNK and small_chunk_wait:
                        # Caught up with a task that writes: a moment's wait turns many
                        # tiny frames into one (as Nagle's algorithm does for TCP).
                        try:
                            after = await asyncio.wait_for(queue.get(), small_chunk_wait)
                        except TimeoutError:
                            break
                    else:
                        break
                    if not (
                        isinstance(after, OutputChunk)
                        and after.stream == message.stream
                        and after.offset == message.offset + size
                        and size + len(after.data) <= self.merge_up_to
                    ):
                        held = after
                        break
                    parts.append(after.data)
                    size += len(after.data)
                yield self._chunk_frame(message, parts)
        finally:
            reader.cancel()
            await asyncio.wait([reader])

    def _chunk_frame(self, first: OutputChunk, parts: list[bytes]) -> bytes:
        if len(parts) == 1:
            return self._encode(first)
        # A frame is its header then the payload raw (see the codec): encode the header
        # of the merged chunk once and put the parts behind it, copying each once.
        header = encode(first.model_copy(update={"data": b""}))
        return b"".join([header, *parts])

    # --- connections ----------------------------------------------------------------------

    def _authorized(self, context: grpc.aio.ServicerContext) -> bool:
        if self._token is None:
            return True
        given = b""
        for key, value in context.invocation_metadata() or ():
            if key == TOKEN_KEY and isinstance(value, str) and value.startswith("Bearer "):
                given = value[len("Bearer ") :].encode()
        return hmac.compare_digest(given, self._token)

    async def _initialize(
        self, message: InitializeConnection, context: grpc.aio.ServicerContext
    ) -> bytes:
        connection = self.server.connect()
        reply = await connection.handle(message)
        if isinstance(reply, ConnectionInfo):
            self.clients[connection.id] = _Client(connection, time.monotonic())
            context.set_trailing_metadata(((KEEPALIVE_KEY, str(int(self.keepalive * 1000))),))
        return self._encode(reply)

    async def _client(self, context: grpc.aio.ServicerContext) -> _Client:
        connection_id = None
        for key, value in context.invocation_metadata() or ():
            if key == CONNECTION_KEY:
                connection_id = value
        if connection_id is None:
            # Before the handshake: a connection for this call only.
            return _Client(self.server.connect(), time.monotonic())
        client = self.clients.get(connection_id)
        if client is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, UNKNOWN_CONNECTION)
        assert client is not None
        return client

    @contextmanager
    def _in_call(self, client: _Client) -> Iterator[None]:
        # A connection with a call in flight (a long wait, an output stream) is alive:
        # gRPC's own keep-alive ends the call if the client really went away.
        client.calls += 1
        try:
            yield
        finally:
            client.calls -= 1
            client.last_seen = time.monotonic()

    def _encode(self, message: Any) -> bytes:
        try:
            return encode(message, max_size=self.server.max_message_size)
        except ProtocolError as exc:
            return encode(Error(code=ErrorCode(exc.code), message=f"cannot send the reply: {exc}"))

    async def expire(self) -> None:
        """Close connections not heard of for the keep-alive time, forever."""
        while True:
            await anyio.sleep(self.keepalive / 4)
            now = time.monotonic()
            for connection_id, client in list(self.clients.items()):
                if client.calls == 0 and now - client.last_seen > self.keepalive:
                    del self.clients[connection_id]
                    if client.connection.leased:
                        log.warning(
                            "session %r went silent for %gs: its lease on node %r ends",
                            client.connection.session_name,
                            self.keepalive,
                            self.server.node.name,
                        )
                    client.connection.close()

    def close(self) -> None:
        for client in self.clients.values():
            client.connection.close()
        self.clients.clear()


# --- serving ----------------------------------------------------------------------------


def split_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6) to its parts; :class:`ConfigError` if
    it is not one."""
    host, sep, port = address.rpartition(":")
    host = host.strip("[]") if host.startswith("[") else host
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ConfigError(
            f"invalid address {address!r}: expected HOST:PORT, e.g. 127.0.0.1:{DEFAULT_PORT}"
        )
    return host, int(port)


def join_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _read(path: object, what: str) -> bytes:
    try:
        return Path(str(path)).expanduser().read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror}") from None


def server_credentials(cert: object, key: object) -> grpc.ServerCredentials | None:
    """TLS credentials from a certificate (chain) and key file, or None for none."""
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        raise ConfigError("TLS needs both a certificate and its key (--tls-cert and --tls-key)")
    cert_pem, key_pem = _read(cert, "TLS certificate"), _read(key, "TLS key")
    if b"-----BEGIN" not in cert_pem:
        raise ConfigError(f"TLS certificate {cert} is not a PEM file")
    if b"PRIVATE KEY-----" not in key_pem:
        raise ConfigError(f"TLS key {key} is not a PEM private key")
    return grpc.ssl_server_credentials([(key_pem, cert_pem)])


def _bind_error(host: str, port: int) -> str:
    """Why grpc could not bind: grpc only says that it failed, so try it ourselves."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        return f"cannot resolve {host!r}: {exc.strerror}"
    for family, kind, proto, _, sockaddr in infos:
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(sockaddr)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    return "the address is in use (is another node serving there?)"
                return exc.strerror or str(exc)
    return "grpc could not bind it"


async def serve(server: NodeServer, options: Mapping[str, object]) -> None:
    """Serve ``server`` until cancelled. ``options``: ``listen`` (``HOST:PORT``,
    default ``127.0.0.1:7100``; port 0 picks a free one), ``tls_cert`` and
    ``tls_key`` (PEM files), ``keepalive`` (seconds a silent client keeps its
    connection and lease) and ``ready``, called with the URL clients reach it at
    once it listens."""
    host, port = split_address(str(options.get("listen") or f"127.0.0.1:{DEFAULT_PORT}"))
    credentials = server_credentials(options.get("tls_cert"), options.get("tls_key"))
    keepalive = float(options.get("keepalive") or DEFAULT_KEEPALIVE)  # type: ignore[arg-type]
    ready: Callable[[str], object] | None = options.get("ready")  # type: ignore[assignment]

    service = NodeService(server, keepalive)
    # Clients learn the largest output chunk from FetchConfig; merged ones are larger.
    output_chunk = server.info.limits.get("output_chunk", 0)
    server.info.limits["output_chunk"] = max(output_chunk, service.merge_up_to)
    grpc_server = grpc.aio.server(options=server_options(server.max_message_size))
    grpc_server.add_generic_rpc_handlers((service.handler(),))
    address = join_address(host, port)
    try:
        if credentials is None:
            bound = grpc_server.add_insecure_port(address)
        else:
            bound = grpc_server.add_secure_port(address, credentials)
    except RuntimeError:
        await grpc_server.stop(None)
        raise ConfigError(f"cannot listen on {address}: {_bind_error(host, port)}") from None
    await grpc_server.start()
    try:
        url = f"{'grpcs' if credentials else 'grpc'}://{join_address(host, bound)}"
        if ready is not None:
            ready(url)
        async with anyio.create_task_group() as tg:
            tg.start_soon(service.expire)
            await anyio.sleep_forever()
    finally:
        with anyio.CancelScope(shield=True):
            await grpc_server.stop(STOP_GRACE)
            service.close()
