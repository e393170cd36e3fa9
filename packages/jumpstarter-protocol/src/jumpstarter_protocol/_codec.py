"""bytes ⇄ message.

A frame is a 4-byte big-endian header length, the message as JSON without its binary
field, then that field's bytes raw. Output chunks are the hot path: carrying their
bytes beside the header instead of base64 inside it keeps the codec near memcpy speed.
"""

from __future__ import annotations

import struct
from typing import Any

from pydantic import BaseModel, TypeAdapter, ValidationError

from ._errors import ProtocolError
from ._messages import Message, OutputChunk

MAX_MESSAGE_SIZE = 16 * 1024 * 1024
"""Default limit on one encoded message, header and payload together."""

_HEADER = struct.Struct(">I")
_PAYLOAD_FIELD = {OutputChunk: "data"}
_adapter: TypeAdapter[Any] = TypeAdapter(Message)


def encode(message: BaseModel, *, max_size: int = MAX_MESSAGE_SIZE) -> bytes:
    """Encode one message to a frame. Raises :class:`ProtocolError` (``too_large``)
    when the frame would exceed ``max_size``."""
    field = _PAYLOAD_FIELD.get(type(message))
    if field is None:
        header = message.__pydantic_serializer__.to_json(message)
        payload = b""
    else:
        header = message.__pydantic_serializer__.to_json(message, exclude={field})
        payload = getattr(message, field)
    size = _HEADER.size + len(header) + len(payload)
    if size > max_size:
        raise ProtocolError(
            f"message of {size} bytes exceeds the limit of {max_size} bytes", code="too_large"
        )
    return b"".join((_HEADER.pack(len(header)), header, payload))


def decode(data: bytes, *, max_size: int = MAX_MESSAGE_SIZE) -> Any:
    """Decode one frame to its message. Anything malformed raises
    :class:`ProtocolError`; nothing else escapes."""
    if len(data) > max_size:
        raise ProtocolError(
            f"message of {len(data)} bytes exceeds the limit of {max_size} bytes",
            code="too_large",
        )
    if len(data) < _HEADER.size:
        raise ProtocolError(f"truncated message: {len(data)} bytes, no header")
    (header_size,) = _HEADER.unpack_from(data)
    end = _HEADER.size + header_size
    if end > len(data):
        raise ProtocolError(
            f"truncated message: header says {header_size} bytes, {len(data) - _HEADER.size} follow"
        )
    view = memoryview(data)
    try:
        message = _adapter.validate_json(view[_HEADER.size : end])
    except ValidationError as exc:
        raise ProtocolError(_describe(exc)) from None
    except (ValueError, RecursionError) as exc:  # pragma: no cover - pydantic wraps these
        raise ProtocolError(f"malformed message: {exc}") from None
    payload = view[end:]
    if payload:
        field = _PAYLOAD_FIELD.get(type(message))
        if field is None:
            raise ProtocolError(f"{message.type} message carries no binary payload")
        setattr(message, field, payload.tobytes())
    return message


def _describe(exc: ValidationError) -> str:
    """One line naming the first problem and where it is."""
    error = exc.errors(include_url=False)[0]
    where = ".".join(str(part) for part in error["loc"]) or "message"
    more = exc.error_count() - 1
    tail = f" (and {more} more)" if more else ""
    return f"invalid message: {where}: {error['msg']}{tail}"
