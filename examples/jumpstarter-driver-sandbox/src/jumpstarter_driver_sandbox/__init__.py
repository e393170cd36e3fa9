"""A Jumpstarter node driver that runs each task in a sandbox: a fresh temporary
directory holding a copy of a workspace, under resource limits, removed afterwards.

Installed, it registers (through its ``jmp.plugins`` entry point ``sandbox``) the node
driver ``sandbox`` and the command ``jmp sandbox`` (list and clean left-over
sandboxes). See README.md for the configuration."""
