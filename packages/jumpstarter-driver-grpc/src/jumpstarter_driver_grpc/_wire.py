"""What both ends of the gRPC transport agree on: the service, its two methods, the
metadata keys and the channel options. No ``.proto``: the messages are the
protocol codec's frames, carried as opaque bytes.

Service ``jumpstarter.v1.Node``:

``Request`` (unary)
    one request frame in, one reply frame out (``Error`` frames included).
``ReadOutput`` (server streaming)
    one ``ReadOutput`` frame in, ``OutputChunk`` frames out, then one ``OutputEnd``
    (or ``Error``) frame.
``PutFile`` (client streaming)
    one ``PutFile`` frame, ``FileChunk`` frames, one ``FileEnd`` frame in; one
    ``FileWritten`` (or ``Error``) frame out.
``GetFile`` (server streaming)
    one ``GetFile`` frame in; ``FileChunk`` frames, then one ``FileEnd`` (or
    ``Error``) frame out.
``Input`` (bidirectional streaming)
    ``WriteInput``, ``CloseInput`` and ``ResizeTerminal`` frames in, one reply frame
    out for each, in order: a task's input (keystrokes) without a call per write.

Metadata on every call:

``authorization: Bearer <token>``
    checked before anything else when the node has a token.
``jmp-connection: <id>``
    the ``connection_id`` of the ``ConnectionInfo`` reply; every call after the
    handshake names it. A call without it gets a connection of its own for that one
    call (enough for ``FetchConfig`` and ``Ping`` on a node without a token).

The ``InitializeConnection`` reply carries ``jmp-keepalive-ms`` in its trailing
metadata: a connection not heard of for that long is closed and its lease released,
so a client sends ``Ping`` (or anything else) well within it.
"""

from __future__ import annotations

import os
from types import ModuleType
from typing import TYPE_CHECKING, Any

from jumpstarter_protocol import MAX_MESSAGE_SIZE

if TYPE_CHECKING:
    import grpc
    import grpc.aio
else:

    class _LazyGrpc:
        """``grpc``, imported on first use. Every jmp command collects the
        transports, so importing this package must not import grpc (~65 ms): only
        a gRPC connection or ``jmp node serve`` touches ``grpc.<name>``."""

        def __getattr__(self, name: str) -> Any:
            return getattr(_import_grpc(), name)

    grpc = _LazyGrpc()

__all__ = ["grpc"]


_grpc_module: ModuleType | None = None


def _import_grpc() -> ModuleType:
    global _grpc_module
    if _grpc_module is not None:
        return _grpc_module
    # grpc's C core logs TLS handshake failures and the like to stderr at INFO level;
    # the CLI already says what went wrong in one line. The level is read when grpc is
    # first imported, so set it for that moment only (tasks the node spawns inherit
    # nothing).
    if "GRPC_VERBOSITY" in os.environ:  # pragma: no cover - the user chose a level
        import grpc.aio
    else:
        os.environ["GRPC_VERBOSITY"] = "NONE"
        try:
            import grpc.aio
        finally:
            del os.environ["GRPC_VERBOSITY"]
    import grpc as module

    _grpc_module = module
    return module


SERVICE = "jumpstarter.v1.Node"
REQUEST_METHOD = "Request"
READ_OUTPUT_METHOD = "ReadOutput"
INPUT_METHOD = "Input"
REQUEST_PATH = f"/{SERVICE}/{REQUEST_METHOD}"
READ_OUTPUT_PATH = f"/{SERVICE}/{READ_OUTPUT_METHOD}"
# --- files
PUT_FILE_METHOD = "PutFile"
GET_FILE_METHOD = "GetFile"
PUT_FILE_PATH = f"/{SERVICE}/{PUT_FILE_METHOD}"
GET_FILE_PATH = f"/{SERVICE}/{GET_FILE_METHOD}"
INPUT_PATH = f"/{SERVICE}/{INPUT_METHOD}"

TOKEN_KEY = "authorization"
CONNECTION_KEY = "jmp-connection"
KEEPALIVE_KEY = "jmp-keepalive-ms"

UNKNOWN_CONNECTION = "unknown connection"
"""Details of the ``NOT_FOUND`` status a node answers for a connection it does not
know (it restarted, or the connection timed out): the client shakes hands again."""

DEFAULT_PORT = 7100
DEFAULT_KEEPALIVE = 30.0
"""Seconds a node keeps a silent client's connection (and lease)."""


def channel_options(max_message_size: int = MAX_MESSAGE_SIZE) -> list[tuple[str, int]]:
    """Options shared by both ends: message size limits, HTTP/2 keep-alive pings
    (a dead peer is noticed within ~30 s even when nothing is sent)."""
    return [
        ("grpc.max_send_message_length", max_message_size),
        ("grpc.max_receive_message_length", max_message_size),
        ("grpc.keepalive_time_ms", 20_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]


def server_options(max_message_size: int) -> list[tuple[str, int]]:
    return [
        *channel_options(max_message_size),
        # Accept the clients' keep-alive pings instead of answering them with GOAWAY.
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.http2.max_ping_strikes", 0),
        # grpc sets SO_REUSEPORT by default: a second node on the same port would
        # silently share it. One port, one node.
        ("grpc.so_reuseport", 0),
    ]


def client_options(max_message_size: int = MAX_MESSAGE_SIZE) -> list[tuple[str, int]]:
    return [
        *channel_options(max_message_size),
        # Reconnect quickly after a blip; grpc's defaults start at 1 s, grow to 120 s.
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 2_000),
    ]
