"""JSON Schema of every message, for clients written in other languages."""

from __future__ import annotations

from typing import Any

from pydantic import TypeAdapter

from ._messages import PROTOCOL_VERSION, Message


def json_schema() -> dict[str, Any]:
    """The JSON Schema of :data:`~jumpstarter_protocol.Message` (every message).

    ``output_chunk.data`` is shown as bytes, but on the wire it follows the JSON
    header raw (see :mod:`jumpstarter_protocol._codec`)."""
    schema = TypeAdapter(Message).json_schema(mode="serialization")
    schema["title"] = "Jumpstarter protocol message"
    schema["description"] = (
        f"Protocol version {PROTOCOL_VERSION}. A frame is a 4-byte big-endian header "
        "length, this JSON header, then the raw bytes of output_chunk.data."
    )
    return schema
