"""Jumpstarter's SSH node driver.

Installed, it registers (through its ``jmp.plugins`` entry point ``ssh``) the node
driver ``ssh``: each task runs on a host reached over one SSH connection (asyncssh),
files move over SFTP. See ``docs/driver-ssh.md``."""
