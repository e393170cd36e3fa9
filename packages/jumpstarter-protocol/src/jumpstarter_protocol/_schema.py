"""JSON Schema of every message, for clients written in other languages."""

from __future__ import annotations

from typing import Any

from pydantic import TypeAdapter

from ._codec import _PAYLOAD_FIELD
from ._messages import PROTOCOL_VERSION, Message


def json_schema() -> dict[str, Any]:
    """The JSON Schema of :data:`~jumpstarter_protocol.Message` (every message) as it
    appears in a frame's JSON header.

    ``output_chunk.data``, ``file_chunk.data`` and ``write_input.data`` are not part of the
    header (the codec refuses them there): their bytes follow the header raw (see
    :mod:`jumpstarter_protocol._codec`)."""
    schema = TypeAdapter(Message).json_schema(mode="serialization")
    for model, field in _PAYLOAD_FIELD.items():
        # The header never holds the payload; a client built from this schema must not
        # put it there (and the model's docstring, kept as description, says where it is).
        definition = schema["$defs"][model.__name__]
        definition["properties"].pop(field, None)
        if field in definition.get("required", []):
            definition["required"].remove(field)
    schema["title"] = "Jumpstarter protocol message"
    schema["description"] = (
        f"Protocol version {PROTOCOL_VERSION}. A frame is a 4-byte big-endian header "
        "length, this JSON header, then the raw bytes of output_chunk.data, "
        "file_chunk.data or write_input.data."
    )
    return schema
