"""The local transport: client and node server in one process, no sockets.

Requests are handed to the node server as the message objects they are; the client
built them through pydantic, so they are valid already, and nothing is encoded.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from jumpstarter import NodeConfig, Transport
from jumpstarter.node import NodeConnection
from jumpstarter.plugins import ClientContext
from jumpstarter_protocol import GetFile, PutFile, ReadOutput


class LocalTransport(Transport):
    """Serves the node inside this process for as long as the session lasts."""

    def __init__(self, connection: NodeConnection) -> None:
        self.connection = connection

    @classmethod
    async def connect(cls, node: NodeConfig, context: ClientContext) -> LocalTransport:
        server = await context.start_node_server(node)
        return cls(server.connect())

    async def request(self, message: Any) -> Any:
        return await self.connection.handle(message)

    def read_output(self, request: ReadOutput) -> AsyncGenerator[Any, None]:
        return self.connection.read_output(request)

    # --- files
    async def put_file(
        self, header: PutFile, chunks: AsyncIterator[Any], *, hashed: bool = False
    ) -> Any:
        # The node writes the very chunk objects the client hashed: no second sha256.
        return await self.connection.put_file(header, chunks, in_process=hashed)

    def get_file(self, request: GetFile) -> AsyncGenerator[Any, None]:
        return self.connection.get_file(request)

    async def aclose(self) -> None:
        self.connection.close()
