"""The gRPC transport: reach a node on another machine (``transport = "grpc"``).

A node's config names where it is and how to trust it::

    [nodes.lab1]
    transport = "grpc"
    endpoint = "grpcs://lab1.example:7100"   # grpc:// for plaintext
    token_file = "~/.config/jumpstarter/lab1.token"
    tls_ca = "~/.config/jumpstarter/lab-ca.pem"   # default: the system's roots
    options = { deadline = 30, reconnect_timeout = 60 }

Every unary call has a deadline (``deadline`` seconds, plus the time the request
itself asks to wait; a start, plus the ``start_timeout`` the node announced: how long
its driver may take to start a task, as a board booting to its shell; a lease, plus its
``lease_timeout``: its ``before_lease`` hook). Once a node was reached, a broken
connection is retried with backoff for up to ``reconnect_timeout`` seconds: requests
that are safe to repeat are sent again, and an output stream resumes from the offset
it had reached, so nothing is lost and nothing doubled. A task's input goes over one
``Input`` stream per connection; each write names its offset in the input, so after a
break it is sent again (as a plain request) and the node skips what it had. If the
node forgot the connection (it restarted, or the client was silent past its
keep-alive), the transport shakes hands again and retakes the lease it held. A
background ``Ping`` keeps the connection (and lease) alive.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import anyio
from jumpstarter import NodeConfig, Transport
from jumpstarter.errors import ConfigError, JumpstarterError, TransportError
from jumpstarter.node import NodeServer
from jumpstarter.plugins import ClientContext
from jumpstarter_protocol import (
    MAX_MESSAGE_SIZE,
    AddResult,
    CloseInput,
    ConfigData,
    ConnectionEstablished,
    ConnectionInfo,
    ConnectNode,
    Error,
    ErrorCode,
    FetchConfig,
    FileChunk,
    GetFile,
    GetTaskStatus,
    InitializeConnection,
    ListTasks,
    NodeInfo,
    NodeReleased,
    OutputChunk,
    ListArtifacts,
    ListFiles,
    OpenUpload,
    Ping,
    ProtocolError,
    PutFile,
    QueryResults,
    ReadOutput,
    ReleaseNode,
    StartRequest,
    StatFile,
    ResizeTerminal,
    StopTask,
    TaskStatus,
    WaitTask,
    WriteInput,
    decode,
    encode,
)

from ._server import TOKEN_REFUSED, join_address
from ._wire import (
    CONNECTION_KEY,
    DEFAULT_PORT,
    GET_FILE_PATH,
    INPUT_PATH,
    KEEPALIVE_KEY,
    PUT_FILE_PATH,
    READ_OUTPUT_PATH,
    REQUEST_PATH,
    SERVICE,
    TOKEN_KEY,
    UNKNOWN_CONNECTION,
    client_options,
    grpc,
)

DEADLINE = 30.0
"""Seconds a unary call may take, beyond what the request itself asks to wait."""
RECONNECT_TIMEOUT = 60.0
"""Seconds to keep trying to reach a node again after the connection broke."""
READY_POLL = 0.05
"""How often a broken channel is looked at while it reconnects."""
WAIT_SLICE = 60.0
"""A long WaitTask is sent as several of at most this many seconds, so each call has
a deadline and a broken connection costs one slice, not the whole wait."""

# Sending these twice does no harm, so they are sent again after a broken connection.
_REPEATABLE = (
    FetchConfig,
    InitializeConnection,
    ConnectNode,
    GetTaskStatus,
    WaitTask,
    ListTasks,
    QueryResults,
    Ping,
    ReleaseNode,
    StopTask,
    # files: an upload's offset is asked again, never assumed
    OpenUpload,
    StatFile,
    ListFiles,
    ListArtifacts,
    # The node skips input it has already (each write names its offset).
    WriteInput,
    CloseInput,
    ResizeTerminal,
)
_INPUT = (WriteInput, CloseInput, ResizeTerminal)


def _repeatable(message: Any) -> bool:
    # A result batch with its id is stored once however often it is sent: the store
    # answers a repeat with the ids it gave the first time.
    return isinstance(message, _REPEATABLE) or (
        isinstance(message, AddResult) and message.batch_id is not None
    )


@dataclass(frozen=True)
class Endpoint:
    """Where a node listens: ``grpc://HOST:PORT`` or ``grpcs://HOST:PORT``."""

    url: str
    host: str
    port: int
    tls: bool

    @property
    def target(self) -> str:
        return join_address(self.host, self.port)

    @classmethod
    def parse(cls, node: NodeConfig) -> Endpoint:
        """The endpoint of ``node``; :class:`ConfigError` when it has none or it is
        not a gRPC URL."""
        url = node.endpoint
        if not url:
            raise ConfigError(
                f"node {node.name!r}: the grpc transport needs an endpoint "
                "(grpc://HOST:PORT, or grpcs://HOST:PORT for TLS)"
            )
        parts = urlsplit(url)
        try:
            port = parts.port or DEFAULT_PORT
        except ValueError:
            port = -1
        if (
            parts.scheme not in ("grpc", "grpcs")
            or not parts.hostname
            or port < 0
            or parts.path not in ("", "/")
            or parts.query
            or parts.username
        ):
            raise ConfigError(
                f"node {node.name!r}: invalid endpoint {url!r}; expected grpc://HOST:PORT "
                "(plaintext) or grpcs://HOST:PORT (TLS)"
            )
        return cls(url, parts.hostname, port, parts.scheme == "grpcs")


@dataclass(frozen=True)
class Settings:
    """The transport's knobs, from the node's ``options`` table."""

    deadline: float = DEADLINE
    reconnect_timeout: float = RECONNECT_TIMEOUT
    tls_server_name: str | None = None

    @classmethod
    def from_node(cls, node: NodeConfig) -> Settings:
        values: dict[str, Any] = {}
        for key in ("deadline", "reconnect_timeout"):
            if key in node.options:
                value = node.options[key]
                if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                    raise ConfigError(
                        f"node {node.name!r}: options.{key} must be a positive number of seconds"
                    )
                values[key] = float(value)
        if "tls_server_name" in node.options:
            values["tls_server_name"] = str(node.options["tls_server_name"])
        return cls(**values)


def read_token(node: NodeConfig) -> str | None:
    """The token in ``node.token_file``, or None when it has none."""
    if node.token_file is None:
        return None
    path = Path(node.token_file).expanduser()
    try:
        token = path.read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or "not text"
        raise ConfigError(
            f"node {node.name!r}: cannot read token_file {node.token_file}: {reason}"
        ) from None
    if not token or not token.isascii() or not token.isprintable():
        raise ConfigError(
            f"node {node.name!r}: token_file {node.token_file} must hold one line "
            "of printable ASCII"
        )
    return token


class _Retry:
    """Reconnecting after a broken connection: backoff with jitter, then wait for the
    channel to be ready, for ``budget`` seconds in all."""

    def __init__(self, budget: float, first: float = 0.1, most: float = 2.0) -> None:
        self.budget, self.first, self.most = budget, first, most
        self.reset()

    def reset(self) -> None:
        """The connection works again: the next failure gets a whole budget."""
        self.delay = self.first
        self.give_up: float | None = None
        self.gave_up = False

    async def wait(self, channel: grpc.aio.Channel) -> bool:
        """Wait before trying again; False once the budget is spent (try no more)."""
        now = time.monotonic()
        if self.give_up is None:
            self.give_up = now + self.budget
        if now >= self.give_up:
            self.gave_up = True
            return False
        await anyio.sleep(min(self.delay * random.uniform(0.75, 1.25), self.give_up - now))
        self.delay = min(self.delay * 2, self.most)
        # Look, rather than await channel_ready(): its watch outlives a cancelled wait
        # inside grpc, and fires later on an event loop that may be gone by then.
        while channel.get_state(try_to_connect=True) != grpc.ChannelConnectivity.READY:
            if time.monotonic() >= self.give_up:
                break
            await anyio.sleep(READY_POLL)
        return True  # one more attempt, even at the end: it says what is wrong now


class GrpcTransport(Transport):
    """One client connection to a node served by ``jmp node serve``."""

    def __init__(
        self,
        node: NodeConfig,
        endpoint: Endpoint,
        channel: grpc.aio.Channel,
        token: str | None,
        settings: Settings,
    ) -> None:
        self.node = node
        self.endpoint = endpoint
        self.channel = channel
        self.settings = settings
        self._token = token
        self._unary = channel.unary_unary(REQUEST_PATH)
        self._stream = channel.unary_stream(READ_OUTPUT_PATH)
        self._put_file = channel.stream_unary(PUT_FILE_PATH)
        self._get_file = channel.unary_stream(GET_FILE_PATH)
        self._input_stub = channel.stream_stream(INPUT_PATH)
        self._input_call: Any = None  # the open Input stream, made by the first write
        self._input_lock = asyncio.Lock()
        self._reached = False  # once true, a broken connection is retried, not fatal
        self._connection_id: str | None = None
        self._handshake: InitializeConnection | None = None
        self._lease: ConnectNode | None = None  # what to send to retake the lease
        self._handshake_lock = asyncio.Lock()
        self._keepalive: asyncio.Task[None] | None = None
        self._closed = False
        # What the node said of itself (its config or lease reply): how long a start
        # (a board booting to its shell) or a lease (its before_lease hook) may take
        # there, which such a request gets on top of the deadline.
        self._node_info: NodeInfo | None = None

    # --- Transport --------------------------------------------------------------------------

    @classmethod
    async def connect(cls, node: NodeConfig, context: ClientContext) -> GrpcTransport:
        """A channel to ``node.endpoint``. Nothing is sent yet: the handshake that
        follows is the first call, and fails at once if the node cannot be reached."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            raise TransportError(
                "the grpc transport runs on asyncio (anyio's default backend)"
            ) from None
        endpoint = Endpoint.parse(node)
        settings = Settings.from_node(node)
        token = read_token(node)
        options: list[tuple[str, Any]] = list(client_options())
        if endpoint.tls:
            roots = None
            if node.tls_ca is not None:
                try:
                    roots = Path(node.tls_ca).expanduser().read_bytes()
                except OSError as exc:
                    raise ConfigError(
                        f"node {node.name!r}: cannot read tls_ca {node.tls_ca}: {exc.strerror}"
                    ) from None
            if settings.tls_server_name:
                options.append(("grpc.ssl_target_name_override", settings.tls_server_name))
            credentials = grpc.ssl_channel_credentials(root_certificates=roots)
            channel = grpc.aio.secure_channel(endpoint.target, credentials, options=options)
        else:
            channel = grpc.aio.insecure_channel(endpoint.target, options=options)
        return cls(node, endpoint, channel, token, settings)

    async def request(self, message: Any) -> Any:
        if isinstance(message, WaitTask) and (
            message.timeout is None or message.timeout > WAIT_SLICE
        ):
            return await self._wait_in_slices(message)
        try:
            frame = encode(message, max_size=MAX_MESSAGE_SIZE)
        except ProtocolError as exc:
            return Error(code=ErrorCode(exc.code), message=str(exc))
        if isinstance(message, ConnectNode) and self._node_info is None:
            # How long its before_lease hook may take is known only from the node.
            await self._call(FetchConfig(), encode(FetchConfig()))
        if isinstance(message, _INPUT):
            reply = await self._input(message, frame)
        else:
            reply = await self._call(message, frame)
        if isinstance(message, ConnectNode) and isinstance(reply, ConnectionEstablished):
            self._lease = message.model_copy(update={"wait": None})
        elif isinstance(message, ReleaseNode) and isinstance(reply, NodeReleased):
            self._lease = None
        return reply

    def read_output(self, request: ReadOutput) -> AsyncIterator[Any]:  # type: ignore[override]
        return self._resumed(self._stream, request)

    # --- files

    async def put_file(
        self, header: PutFile, chunks: AsyncIterator[Any], *, hashed: bool = False
    ) -> Any:
        """One upload stream. A broken connection is a :class:`TransportError`: the
        client asks the node where to resume (``OpenUpload``, retried as any request).
        ``hashed`` is ignored: bytes that crossed a wire are hashed again by the node."""

        # Written here rather than handed to grpc as a request iterator: grpc would
        # read the chunks in a task of its own that can still be inside them when the
        # call fails, and the caller could then not close them to resume.
        call = self._put_file(metadata=self._metadata())
        try:
            with contextlib.suppress(asyncio.InvalidStateError):  # ended: its status says why
                await call.write(encode(header))
                async for message in chunks:
                    await call.write(encode(message))
                await call.done_writing()
            data = await call
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc) from None
        finally:
            call.cancel()
        return self._explain(self._decode(data))

    def get_file(self, request: GetFile) -> AsyncIterator[Any]:  # type: ignore[override]
        """A download, resumed from the offset reached after a broken connection."""
        return self._resumed(self._get_file, request)

    async def _resumed(self, stub: Any, request: Any) -> AsyncIterator[Any]:
        """The stream ``stub`` answers ``request`` with (output or file chunks, then
        one end message), reopened from the offset reached when the connection breaks:
        nothing lost, nothing doubled."""
        offset = request.offset
        retry = _Retry(self.settings.reconnect_timeout)
        handshaken = False
        while True:
            frame = encode(request.model_copy(update={"offset": offset}))
            stale = self._connection_id
            # Fail fast: a stream has no deadline, so waiting for the node to come
            # back is done below, within reconnect_timeout.
            call = stub(frame, metadata=self._metadata())
            try:
                async for data in call:
                    message = self._decode(data)
                    if isinstance(message, OutputChunk | FileChunk):
                        if message.offset < offset:  # never hand a byte out twice
                            message.data = message.data[offset - message.offset :]
                            message.offset = offset
                        if message.data:
                            offset = message.offset + len(message.data)
                            yield message
                        retry.reset()
                        handshaken = False
                        continue
                    yield self._explain(message)
                    return
                raise TransportError(f"{self.where} ended the {request.type} stream early")
            except grpc.aio.AioRpcError as exc:
                if self._unknown_connection(exc) and not handshaken:
                    handshaken = True
                    await self._handshake_again(stale)
                    continue
                if (
                    exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
                    or not self._reached
                    or self._closed
                    or not await retry.wait(self.channel)
                ):
                    raise self._error(exc, None, retry) from None
            finally:
                call.cancel()

    async def _input(self, message: Any, frame: bytes) -> Any:
        """Send input over the ``Input`` stream, one reply per frame. If the stream
        breaks, the frame goes again as a plain request, retried and re-handshaken as
        any other; the next write opens a new stream."""
        async with self._input_lock:
            try:
                if self._input_call is None:
                    self._input_call = self._input_stub(metadata=self._metadata())
                await self._input_call.write(frame)
                data = await self._input_call.read()
                if data is not grpc.aio.EOF:
                    return self._explain(self._decode(data))
            except grpc.aio.AioRpcError:
                pass
            except grpc.aio.UsageError:  # written to a stream that already ended
                pass
            if self._input_call is not None:
                self._input_call.cancel()
                self._input_call = None
        return await self._call(message, frame)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._input_call is not None:
            self._input_call.cancel()
        if self._keepalive is not None:
            self._keepalive.cancel()
            await asyncio.wait([self._keepalive])
        await self.channel.close()

    @classmethod
    async def serve(cls, server: NodeServer, options: dict[str, object]) -> None:
        """Serve ``server`` over gRPC; see :func:`jumpstarter_driver_grpc._server.serve`."""
        from ._server import serve

        await serve(server, options)

    @property
    def where(self) -> str:
        """The node, as error messages name it."""
        if self.node.name == self.endpoint.url:  # reached by --endpoint, not by name
            return f"the node at {self.endpoint.url}"
        return f"node {self.node.name!r} at {self.endpoint.url}"

    # --- calls -------------------------------------------------------------------------------

    def _metadata(self, *, handshake: bool = False) -> tuple[tuple[str, str], ...]:
        metadata = []
        if self._token is not None:
            metadata.append((TOKEN_KEY, f"Bearer {self._token}"))
        if self._connection_id is not None and not handshake:
            metadata.append((CONNECTION_KEY, self._connection_id))
        return tuple(metadata)

    async def _call(self, message: Any, frame: bytes, *, handshake_again: bool = True) -> Any:
        """Send one frame, retrying what may be retried; the decoded reply."""
        timeout = self.settings.deadline + _extra_time(message, self._node_info)
        handshake = isinstance(message, InitializeConnection)
        retry = _Retry(self.settings.reconnect_timeout)
        while True:
            stale = self._connection_id
            # Fail fast: waiting for a broken connection to come back is done below,
            # within reconnect_timeout, not within each call's deadline.
            call = self._unary(frame, timeout=timeout, metadata=self._metadata(handshake=handshake))
            try:
                data = await call
            except grpc.aio.AioRpcError as exc:
                if handshake_again and self._unknown_connection(exc) and self._handshake:
                    handshake_again = False
                    await self._handshake_again(stale)
                    continue
                # A release is not retried: the lease ends anyway when the keep-alive
                # runs out, and closing a session must not hang on a dead node.
                if (
                    exc.code() == grpc.StatusCode.UNAVAILABLE
                    and self._reached
                    and not isinstance(message, ReleaseNode)
                    and (_repeatable(message) or _never_sent(exc))
                    and await retry.wait(self.channel)
                ):
                    continue
                raise self._error(exc, timeout, retry) from None
            break
        reply = self._decode(data)
        self._reached = True
        if isinstance(reply, ConfigData | ConnectionEstablished):
            self._node_info = reply.node
        if handshake and isinstance(reply, ConnectionInfo):
            self._connection_id = reply.connection_id
            self._handshake = message
            keepalive = _keepalive_seconds(await call.trailing_metadata())
            if keepalive and self._keepalive is None and not self._closed:
                self._keepalive = asyncio.get_running_loop().create_task(
                    self._keep_alive(keepalive / 3)
                )
        return self._explain(reply)

    async def _handshake_again(self, stale: str | None) -> None:
        """The node no longer knows our connection: shake hands again, retake the lease."""
        async with self._handshake_lock:
            if self._connection_id != stale or self._handshake is None:
                return  # another call did it meanwhile
            reply = await self._call(
                self._handshake, encode(self._handshake), handshake_again=False
            )
            if isinstance(reply, Error):
                raise TransportError(f"{self.where} refused to connect again: {reply.message}")
            if self._lease is not None:
                lease = await self._call(self._lease, encode(self._lease), handshake_again=False)
                if not isinstance(lease, ConnectionEstablished):
                    self._lease = None  # another session holds it now; requests will say so

    async def _wait_in_slices(self, message: WaitTask) -> Any:
        until = None if message.timeout is None else time.monotonic() + message.timeout
        while True:
            left = (
                WAIT_SLICE if until is None else min(WAIT_SLICE, max(until - time.monotonic(), 0.0))
            )
            reply = await self.request(message.model_copy(update={"timeout": left}))
            if (
                not isinstance(reply, TaskStatus)
                or reply.task.state.finished
                or (until is not None and time.monotonic() >= until)
            ):
                return reply

    async def _keep_alive(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            # A failed ping is tried again next time; real requests report failures.
            with contextlib.suppress(JumpstarterError):
                await self.request(Ping())

    # --- replies and errors ----------------------------------------------------------------

    def _decode(self, data: bytes) -> Any:
        try:
            return decode(data, max_size=MAX_MESSAGE_SIZE)
        except ProtocolError as exc:
            raise TransportError(f"{self.where} sent an invalid reply: {exc}") from None

    def _explain(self, reply: Any) -> Any:
        """Say which token a node refused: the node itself says no more than no."""
        if (
            isinstance(reply, Error)
            and reply.code == ErrorCode.UNAUTHORIZED
            and reply.message == TOKEN_REFUSED
        ):
            if self._token is None:
                text = (
                    f"{self.where} requires a token: give its token file (token_file, --token-file)"
                )
            else:
                text = f"{self.where} refused the token in {self.node.token_file}"
            return reply.model_copy(update={"message": text})
        return reply

    @staticmethod
    def _unknown_connection(exc: grpc.aio.AioRpcError) -> bool:
        return exc.code() == grpc.StatusCode.NOT_FOUND and exc.details() == UNKNOWN_CONNECTION

    def _error(
        self, exc: grpc.aio.AioRpcError, timeout: float | None = None, retry: _Retry | None = None
    ) -> TransportError:
        what = "lost connection to" if self._reached else "cannot reach"
        tail = f" (gave up after {retry.budget:g}s)" if retry is not None and retry.gave_up else ""
        return TransportError(f"{what} {self.where}: {self._reason(exc, timeout)}{tail}")

    def _reason(self, exc: grpc.aio.AioRpcError, timeout: float | None = None) -> str:
        """grpc's error, in a few words a person can act on."""
        code, details = exc.code(), exc.details() or ""
        lower = details.lower()
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return f"no answer within {timeout:g}s" if timeout else "no answer in time"
        if code == grpc.StatusCode.UNIMPLEMENTED:
            return f"it is not a Jumpstarter node (no {SERVICE} service there)"
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            return f"message too large: {details}"
        if "certificate_verify_failed" in lower:
            why = details.split("CERTIFICATE_VERIFY_FAILED", 1)[1].strip(": ").removesuffix(": OK")
            return (
                f"certificate verify failed{f' ({why})' if why else ''}: "
                "give the CA that signed the node's certificate as tls_ca (--tls-ca)"
            )
        if "hostname verification" in lower or "peer name" in lower:
            return (
                f"the node's certificate is not for {self.endpoint.host!r} "
                "(connect by a name it is for, or set options.tls_server_name)"
            )
        if "wrong_version_number" in lower:
            return (
                "TLS handshake failed: the node does not speak TLS "
                "(use grpc:// for a plaintext node)"
            )
        if "handshake failed" in lower:
            return "TLS handshake failed: " + details.rsplit("handshake failed", 1)[1].strip(" :")
        if (
            not self._reached
            and not self.endpoint.tls
            and ("socket closed" in lower or "connection reset" in lower)
        ):
            return "the node closed the connection (if it serves TLS, use grpcs://)"
        if "connection refused" in lower:
            return "connection refused"
        if "domain name not found" in lower or "dns" in lower or "resolv" in lower:
            return f"cannot resolve host {self.endpoint.host!r}"
        if "timed out" in lower or "timeout" in lower:
            return "connection timed out"
        # "failed to connect to all addresses; last error: UNKNOWN: ipv4:1.2.3.4:5: why"
        last = details.rsplit("last error: ", 1)[-1]
        return last.rsplit(": ", 1)[-1] if ": " in last else (last or code.name.lower())


def _extra_time(message: Any, node: NodeInfo | None = None) -> float:
    """How long a request itself asks the node to take; a start or a lease, as long as
    the node said one may take there (``start_timeout``, ``lease_timeout``)."""
    if isinstance(message, StartRequest):
        return node.start_timeout if node else 0.0
    if isinstance(message, ConnectNode):
        return (message.wait or 0.0) + (node.lease_timeout if node else 0.0)
    if isinstance(message, WaitTask):
        return message.timeout or 0.0
    if isinstance(message, StopTask):
        return message.grace
    return 0.0


def _never_sent(exc: grpc.aio.AioRpcError) -> bool:
    """True when grpc failed a call because it had no connection to send it on."""
    return "failed to connect to all addresses" in (exc.details() or "")


def _keepalive_seconds(metadata: Any) -> float | None:
    for key, value in metadata or ():
        if key == KEEPALIVE_KEY:
            try:
                return max(int(value) / 1000, 0.3)
            except ValueError:
                return None
    return None
