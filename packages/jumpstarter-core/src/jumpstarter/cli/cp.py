"""``jmp cp``: copy files to and from a node, as ``scp`` does."""

from __future__ import annotations

import re

import click

from ._base import call_node, handle_errors

_REMOTE = re.compile(r"^([A-Za-z0-9][A-Za-z0-9_.@-]*):(.*)$", re.DOTALL)


def split_remote(arg: str) -> tuple[str | None, str]:
    """``NODE:PATH`` to its parts; anything else is a local path (``(None, arg)``).
    A local name with a colon is written ``./a:b``."""
    match = _REMOTE.match(arg)
    if match is None:
        return None, arg
    return match.group(1), match.group(2)


@click.command()
@click.option("-r", "--recursive", is_flag=True, help="Copy directories and what they hold (modes kept).")
@click.option("-s", "--session", default="cp", show_default=True, help="Session name.")
@click.option("-v", "--verbose", is_flag=True, help="Print each file copied, with its size and sha256.")
@click.argument("source")
@click.argument("target")
@click.pass_obj
@handle_errors
def cp(state, recursive, session, verbose, source, target) -> None:
    """Copy SOURCE to TARGET; one of them is NODE:PATH, a path on a node.

    A relative PATH is relative to the node's files root, or else the directory
    the node serves from. TARGET may be a directory (or end in '/'): the file goes
    into it. Each file is checked end to end (sha256) and appears under its name only
    once it arrived whole; an upload whose connection drops resumes where the node
    stopped. A node with a files root (jmp node serve --files-root) refuses paths
    outside it; without one, the node user's permissions apply.

    \b
    Examples:
      jmp cp fw.bin lab1:/tmp/fw.bin
      jmp cp lab1:/var/log/boot.log .
      jmp cp -r build/ lab1:work/
    """
    src_node, src_path = split_remote(source)
    dst_node, dst_path = split_remote(target)
    if (src_node is None) == (dst_node is None):
        what = "two nodes" if src_node else "two local paths"
        raise click.UsageError(f"cannot copy between {what}: give one side as NODE:PATH and the other local")

    async def copy(node):
        if dst_node is not None:
            return await node.put(src_path, dst_path or ".", recursive=recursive)
        return await node.get(src_path or ".", dst_path, recursive=recursive)

    # Writing to a node takes its lease, as starting a task does; reading does not.
    done = call_node(state, copy, node=src_node or dst_node, session=session, lease=dst_node is not None,
                     writes=True)
    if verbose:
        for item in done:
            click.echo(f"{item.source} -> {item.target} {item.size} bytes sha256 {item.sha256}")
