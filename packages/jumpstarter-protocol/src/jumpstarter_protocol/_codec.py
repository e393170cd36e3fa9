"""bytes ⇄ message.

A frame is a 4-byte big-endian header length, the message as JSON without its binary
field, then that field's bytes raw. Output and file chunks are the hot path: carrying
their bytes beside the header instead of base64 inside it keeps the codec near memcpy speed.
"""

from __future__ import annotations

import struct
from typing import Any

from pydantic import BaseModel, TypeAdapter, ValidationError
from pydantic_core import PydanticSerializationError

from ._errors import ProtocolError
from ._messages import ConsoleData, FileChunk, Message, OutputChunk, WriteConsole, WriteInput

MAX_MESSAGE_SIZE = 16 * 1024 * 1024
"""Default limit on one encoded message, header and payload together."""

_HEADER = struct.Struct(">I")
_PAYLOAD_FIELD = {
    OutputChunk: "data",
    FileChunk: "data",
    WriteInput: "data",
    ConsoleData: "data",
    WriteConsole: "data",
}
_adapter: TypeAdapter[Any] = TypeAdapter(Message)


def encode(message: BaseModel, *, max_size: int = MAX_MESSAGE_SIZE) -> bytes:
    """Encode one message to a frame. Raises :class:`ProtocolError`: ``too_large`` when
    the frame would exceed ``max_size``, ``bad_request`` when a value cannot be written
    as JSON (a string with lone surrogates, an object in ``Error.details``...)."""
    field = _PAYLOAD_FIELD.get(type(message))
    try:
        if field is None:
            header = message.__pydantic_serializer__.to_json(message)
            payload = b""
        else:
            header = message.__pydantic_serializer__.to_json(message, exclude={field})
            payload = getattr(message, field)
    except PydanticSerializationError as exc:
        name = getattr(message, "type", type(message).__name__)
        raise ProtocolError(f"cannot encode {name} message: {_one_line(str(exc))}") from None
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
        raise ProtocolError(
            f"truncated message: {len(data)} bytes, shorter than the "
            f"{_HEADER.size}-byte header length"
        )
    (header_size,) = _HEADER.unpack_from(data)
    end = _HEADER.size + header_size
    if end > len(data):
        raise ProtocolError(
            f"truncated message: the header is {header_size} bytes "
            f"but only {len(data) - _HEADER.size} follow"
        )
    view = memoryview(data)
    try:
        # pydantic parses bytes, not a memoryview; the header is small, the copy cheap.
        message = _adapter.validate_json(view[_HEADER.size : end].tobytes())
    except ValidationError as exc:
        raise ProtocolError(_describe(exc)) from None
    except (ValueError, RecursionError) as exc:  # pragma: no cover - pydantic wraps these
        raise ProtocolError(f"malformed message: {_one_line(str(exc))}") from None
    field = _PAYLOAD_FIELD.get(type(message))
    if field is not None and field in message.model_fields_set:
        # Only the raw bytes after the header may set it; a JSON copy would be read as
        # UTF-8 text, not as the base64 pydantic writes, so refuse rather than guess.
        raise ProtocolError(
            f"invalid {message.type} message: {field} must follow the header raw, "
            "not be inside it"
        )
    payload = view[end:]
    if payload:
        if field is None:
            raise ProtocolError(
                f"invalid {message.type} message: {len(payload)} bytes follow the header, "
                "but it carries no binary payload"
            )
        # A file chunk keeps a view of the frame: it is only hashed and written, and
        # a copy of megabytes per message is a tenth of a transfer's time.
        setattr(message, field, payload if type(message) is FileChunk else payload.tobytes())
    return message


_MAX_PART = 80


def _one_line(text: str, limit: int | None = None) -> str:
    """``text`` with control characters escaped, cut at ``limit`` characters."""
    if limit is not None and len(text) > limit:
        text = text[: limit - 1] + "…"
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode() for ch in text)


def _describe(exc: ValidationError) -> str:
    """One line naming the first problem and where it is."""
    error = exc.errors(include_url=False)[0]
    more = exc.error_count() - 1
    tail = f" (and {more} more)" if more else ""
    if error["type"] == "union_tag_invalid":
        tag = _one_line(repr(error.get("ctx", {}).get("tag")), _MAX_PART)
        return f"unknown message type {tag}{tail}"
    if error["type"] == "union_tag_not_found":
        return f"invalid message: it has no 'type'{tail}"
    loc = [_one_line(str(part), _MAX_PART) for part in error["loc"]]
    msg = _one_line(error["msg"])
    if not loc:
        return f"invalid message: {msg}{tail}"
    # With a discriminated union the first part of loc is the message's type.
    kind, where = loc[0], ".".join(loc[1:])
    return f"invalid {kind} message: {where + ': ' if where else ''}{msg}{tail}"
