"""Jumpstarter's network transport: nodes on other machines, over gRPC.

Installed, it registers (through its ``jmp.plugins`` entry point ``grpc``) the
transport ``grpc``: clients reach a node at ``grpc://HOST:PORT`` (plaintext) or
``grpcs://HOST:PORT`` (TLS) with a bearer token, and ``jmp node serve`` serves a node
driver of this machine through it.

The protocol's frames travel as they are (see :mod:`jumpstarter_driver_grpc._wire`
for the service, its two methods and the metadata); there is no second schema.
"""
