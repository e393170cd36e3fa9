"""``jmp power on|off|cycle|status``: a node's board power."""

from __future__ import annotations

import click

from ._base import call_node, handle_errors


@click.command()
@click.argument("action", type=click.Choice(["on", "off", "cycle", "status"]))
@click.option("-n", "--node", help="Node (default: the config's default_node).")
@click.option("-s", "--session", default="power", show_default=True, help="Session name (for the lease).")
@click.pass_obj
@handle_errors
def power(state, action, node, session) -> None:
    """Switch a node's board on or off, power cycle it, or show its power state.

    Takes the node's lease for the moment it needs, as `jmp run` does (so it fails,
    exit 4, while another session holds the node). Prints the state afterwards:
    on, off or unknown (a back end that cannot tell). The node's config says how
    its board is powered: power = {driver = "command", on = [...], off = [...]}.

    \b
    Examples:
      jmp power cycle --node rpi4
      jmp power status --node rpi4
    """

    async def act(n):
        return await n.power(action)

    result = call_node(state, act, node=node, session=session, lease=True)
    click.echo(f"{node or state.protocol.config.default_node}: {result}")
