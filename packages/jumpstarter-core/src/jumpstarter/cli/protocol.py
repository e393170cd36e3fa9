"""``jmp protocol schema``: the wire protocol, for clients in other languages."""

from __future__ import annotations

import json

import click


@click.group()
def protocol() -> None:
    """The wire protocol Jumpstarter speaks."""


@protocol.command()
def schema() -> None:
    """Print the JSON Schema of every protocol message.

    Each frame on the wire is a 4-byte big-endian header length, a JSON header valid
    against this schema, then the raw bytes of output_chunk.data.

    \b
    Example:
      jmp protocol schema > jumpstarter-protocol.schema.json
    """
    from jumpstarter_protocol import json_schema

    click.echo(json.dumps(json_schema(), indent=2, ensure_ascii=False))
