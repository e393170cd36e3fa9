"""``jmp console``: a board's console in this terminal, or its transcript."""

from __future__ import annotations

import os
import signal
import sys

import click

from ._base import handle_errors

LEAVE = b"~."


@click.command()
@click.option("-n", "--node", help="Node (default: the config's default_node).")
@click.option("-s", "--session", default="console", show_default=True, help="Session name (for the lease).")
@click.option("--read-only", is_flag=True, help="Watch only: type nothing, take no lease (works while a task runs).")
@click.option("--log", "log", is_flag=True, help="Print the node's console transcript so far and exit.")
@click.pass_obj
@handle_errors
def console(state, node, session, read_only, log) -> None:
    """Attach this terminal to a node's console (a board's serial console).

    What the board prints appears here; what you type goes to the board, byte for
    byte (the terminal is in raw mode: Ctrl-C goes to the board too). Type ~. at the
    start of a line to leave (~~ sends one ~). The terminal is restored however jmp
    ends. Typing takes the node's lease; while a task runs on the console it is
    read-only. --read-only watches without a lease (leave with ~. or Ctrl-C).

    --log prints the transcript the node keeps of everything its board printed
    (boot logs, kernel panics, tasks) and exits.

    \b
    Examples:
      jmp console --node rpi4
      jmp console --node rpi4 --read-only
      jmp console --node rpi4 --log | grep -i panic
    """
    import anyio

    if log and read_only:
        raise click.UsageError("--log prints the transcript and exits: it takes no --read-only")
    anyio.run(_console, state.protocol, node, session, read_only, log)


async def _console(protocol, node_name, session_name, read_only, log) -> None:
    async with protocol.create_async_session(session_name) as session:
        node = await session.connect(node_name, lease=not (read_only or log))
        if log:
            await _print_log(node)
        else:
            await _attach(node, read_only)


async def _print_log(node) -> None:
    out = sys.stdout.buffer
    offset = 0
    while True:
        chunk = await node.read_console(offset)
        out.write(chunk.data)
        offset = chunk.offset + len(chunk.data)
        if offset >= chunk.end:
            out.flush()
            return


async def _attach(node, read_only: bool) -> None:
    import anyio

    stdin = sys.stdin.fileno()
    terminal = os.isatty(stdin)
    saved = None
    if terminal:
        import termios
        import tty

        saved = termios.tcgetattr(stdin)
        tty.setraw(stdin)
    err = sys.stderr
    try:
        mode = "watching (read-only)" if read_only else "on"
        err.write(f"jmp: {mode} the console of node {node.name!r}; ~. leaves\r\n")
        err.flush()
        async with anyio.create_task_group() as tg:
            tg.start_soon(_show, node)
            tg.start_soon(_leave_on_signals, tg.cancel_scope)
            if terminal or not read_only:
                await _type(node, stdin, read_only)
                tg.cancel_scope.cancel()
    finally:
        if saved is not None:
            import termios

            termios.tcsetattr(stdin, termios.TCSADRAIN, saved)
        err.write("\r\njmp: left the console\n")
        err.flush()


async def _leave_on_signals(scope) -> None:
    import anyio

    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGHUP, signal.SIGINT) as signals:
        async for _ in signals:
            scope.cancel()
            return


async def _show(node) -> None:
    out = sys.stdout.buffer
    offset = None
    while True:
        chunk = await node.read_console(offset, wait=1.0)
        if chunk.data:
            out.write(chunk.data)
            out.flush()
        offset = chunk.offset + len(chunk.data)


async def _type(node, stdin: int, read_only: bool) -> None:
    """Send what is typed, until ~. at the start of a line (or the end of input)."""
    import anyio
    from jumpstarter.errors import Conflict

    os.set_blocking(stdin, False)
    keys = Keys(read_only)
    told = False
    try:
        while True:
            try:
                data = os.read(stdin, 4096)
            except BlockingIOError:
                await anyio.wait_readable(stdin)
                continue
            if not data:
                return
            send, leave = keys.feed(data)
            if leave:
                if send and not read_only:
                    await node.write_console(send)
                return
            if send and not read_only:
                try:
                    await node.write_console(send)
                except Conflict as exc:
                    if not told:
                        sys.stderr.write(f"\r\njmp: {exc}\r\n")
                        sys.stderr.flush()
                        told = True
    finally:
        os.set_blocking(stdin, True)


class Keys:
    """What is typed, less the escape: ``~.`` at the start of a line leaves, ``~~``
    sends one ``~``; read-only, Ctrl-C leaves too.

    Escape sequences (``ESC [ … final``) are sent but do not end a line's start: a
    board's shell asks the terminal where its cursor is after each prompt, and the
    terminal's answer (``ESC [ 12 ; 5 R``) arrives as if typed."""

    def __init__(self, read_only: bool = False) -> None:
        self.read_only = read_only
        self.line_start = True
        self.tilde = False
        self.escape = b""

    def feed(self, data: bytes) -> tuple[bytes, bool]:
        """The bytes to send, and whether to leave (after sending them)."""
        send = bytearray()
        for byte in data:
            char = bytes([byte])
            if self.escape:
                send += char
                self.escape += char
                if len(self.escape) == 2 and char != b"[" or len(self.escape) > 2 and 0x40 <= byte <= 0x7E:
                    self.escape = b""
                continue
            if self.tilde:
                self.tilde = False
                if char == b".":
                    return bytes(send), True
                send += b"~" if char == b"~" else b"~" + char
            elif char == b"\x1b":
                send += char
                self.escape = char
                continue
            elif self.line_start and char == b"~":
                self.tilde = True
                continue
            elif self.read_only and char == b"\x03":
                return bytes(send), True
            else:
                send += char
            self.line_start = char in (b"\r", b"\n")
        return bytes(send), False
