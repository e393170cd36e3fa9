"""Jumpstarter's local node driver and local transport.

Installed, it registers (through its ``jmp.plugins`` entry point ``local``) the node
driver ``local`` — tasks as subprocesses of this machine — and the transport
``local`` — client and node in one process."""
