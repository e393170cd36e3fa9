"""The root of every Jumpstarter error, and the protocol's own.

Every package of the project raises subclasses of :class:`JumpstarterError`; the core
draws the whole tree in ``jumpstarter.errors``. The protocol needs only two of them.
"""

from __future__ import annotations


class JumpstarterError(Exception):
    """Root of every error Jumpstarter raises on purpose."""


class ProtocolError(JumpstarterError):
    """Raised when bytes are not a valid message: truncated, not JSON, an unknown
    ``type``, a wrong field, deeper than allowed or larger than the size limit.

    ``code`` is the :class:`~jumpstarter_protocol.ErrorCode` a node answers with.
    """

    def __init__(self, message: str, *, code: str = "bad_request") -> None:
        super().__init__(message)
        self.code = code
