"""Every error Jumpstarter raises on purpose::

    JumpstarterError
    ├── ProtocolError        bytes that are not a valid message (jumpstarter_protocol)
    ├── ConfigError          a config file or value is wrong; names the file and key
    ├── PluginError          a plugin failed to load, or a transport/driver is unknown
    ├── TransportError       a node could not be reached, or the connection broke
    │   └── NodeOffline      the registry says the node is offline
    ├── LocalFileError       a file to send is missing, or a fetched one cannot be written here
    └── NodeError            a node answered with an Error reply; ``code`` says which
        ├── BadRequest
        ├── NotFound
        ├── Conflict
        ├── Unauthorized
        ├── VersionMismatch
        ├── TooLarge
        ├── SpawnFailed      the task's command could not be started
        ├── Unavailable
        │   └── PowerFailed  a power action (on, off, cycle, status) failed
        └── InternalError

The node server raises ``NodeError`` subclasses; the dispatcher turns them into
``Error`` replies, and the client turns those back into the same classes, so code on
either side catches the same exception. Only the CLI turns them into one line of text.
"""

from __future__ import annotations

from typing import Any

from jumpstarter_protocol import Error, ErrorCode, JumpstarterError, ProtocolError

__all__ = [
    "JumpstarterError",
    "ProtocolError",
    "ConfigError",
    "PluginError",
    "TransportError",
    "LocalFileError",
    "NodeOffline",
    "NodeError",
    "BadRequest",
    "NotFound",
    "Conflict",
    "Unauthorized",
    "VersionMismatch",
    "TooLarge",
    "SpawnFailed",
    "Unavailable",
    "PowerFailed",
    "InternalError",
]


class ConfigError(JumpstarterError):
    """Raised when a config file cannot be read or a value in it is invalid. The
    message names the file and the key."""


class PluginError(JumpstarterError):
    """Raised when a plugin fails to load, or a transport or node driver is asked for
    by a name no installed plugin registers."""


class TransportError(JumpstarterError):
    """Raised when a node cannot be reached or the connection to it breaks."""


class LocalFileError(JumpstarterError):
    """Raised when a local file to put on a node is missing or unreadable (or a
    directory without ``recursive``), or a fetched file cannot be written here."""


class NodeOffline(TransportError):
    """Raised when the shared registry says a node is offline (its agent stopped, or
    sent no heartbeat for the timeout), before anything tries to reach it. ``node``
    names it; ``since`` is its last heartbeat (epoch seconds), None if its agent
    stopped cleanly."""

    def __init__(self, node: str, since: float | None) -> None:
        self.node = node
        self.since = since
        super().__init__(f"node {node!r} is {self.offline}")

    @property
    def offline(self) -> str:
        """``offline since 2024-05-01T14:30:00+00:00`` (or ``offline (its agent stopped)``)."""
        if not self.since:
            return "offline (its agent stopped)"
        from datetime import UTC, datetime

        return f"offline since {datetime.fromtimestamp(self.since, UTC).isoformat(timespec='seconds')}"


class NodeError(JumpstarterError):
    """Raised when a node answers a request with an ``Error`` reply."""

    code: ErrorCode = ErrorCode.INTERNAL

    def __init__(self, message: str, *, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details or {}

    def to_reply(self) -> Error:
        return Error(code=self.code, message=self.message, details=self.details)

    @staticmethod
    def from_reply(reply: Error) -> NodeError:
        return _BY_CODE.get(reply.code, NodeError)(reply.message, details=dict(reply.details))


class BadRequest(NodeError):
    """The request was well-formed but not acceptable (a missing cwd, a bad filter)."""

    code = ErrorCode.BAD_REQUEST


class NotFound(NodeError):
    """No task, session or node by that name or id."""

    code = ErrorCode.NOT_FOUND


class Conflict(NodeError):
    """The request clashes with the current state (the node is leased by another
    session, a task was started already)."""

    code = ErrorCode.CONFLICT


class Unauthorized(NodeError):
    """A missing or wrong token, or a request before the handshake."""

    code = ErrorCode.UNAUTHORIZED


class VersionMismatch(NodeError):
    """Client and node share no protocol version."""

    code = ErrorCode.VERSION_MISMATCH


class TooLarge(NodeError):
    """A message over the size limit."""

    code = ErrorCode.TOO_LARGE


class SpawnFailed(NodeError):
    """The task's command could not be started; ``details["errno"]`` says why
    (``ENOENT``: no such command, exit code 127; anything else 126)."""

    code = ErrorCode.SPAWN_FAILED


class Unavailable(NodeError):
    """The node is shutting down or cannot serve the request right now."""

    code = ErrorCode.UNAVAILABLE


class PowerFailed(Unavailable):
    """A power back end could not do what it was asked (its command failed, its URL
    did not answer); the message says which and why."""


class InternalError(NodeError):
    """A bug or an unexpected failure on the node; the node keeps serving."""

    code = ErrorCode.INTERNAL


_BY_CODE: dict[ErrorCode, type[NodeError]] = {
    cls.code: cls
    for cls in (
        BadRequest,
        NotFound,
        Conflict,
        Unauthorized,
        VersionMismatch,
        TooLarge,
        SpawnFailed,
        Unavailable,
        InternalError,
    )
}


def sole_error(exc: BaseException) -> BaseException:
    """The one error inside (nested) exception groups of one error each, as anyio
    task groups wrap them; ``exc`` itself otherwise."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc
