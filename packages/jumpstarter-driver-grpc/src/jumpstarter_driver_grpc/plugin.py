"""The plugin module named by this package's ``jmp.plugins`` entry point ``grpc``."""

from __future__ import annotations

from collections.abc import Callable

from jumpstarter import hookimpl


@hookimpl
def jmp_register_transports(register: Callable[[str, type], None]) -> None:
    # Imported here, not at the top: grpc loads only when a node needs it.
    from .transport import GrpcTransport

    register("grpc", GrpcTransport)
