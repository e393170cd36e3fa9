"""``jmp node info``: what a node says of itself."""

from __future__ import annotations

from typing import Any

import click

from ._base import call_node, handle_errors
from ._output import dump, format_option, print_fields, print_json


@click.command()
@click.option("-n", "--node", help="Node (default: the config's default_node, 'local').")
@format_option("text", "json", help="text: one field a line; json: the node's info (see README).")
@click.pass_obj
@handle_errors
def info(state, node, fmt) -> None:
    """Show what a node says of itself (FetchConfig): its name, labels, node driver,
    capabilities, limits and versions."""

    async def fetch(n: Any) -> Any:
        return await n.fetch_config()

    node_info = call_node(state, fetch, node=node)
    if fmt == "json":
        print_json(dump(node_info))
        return
    print_fields(
        [
            ("node", node_info.name),
            ("driver", node_info.driver),
            ("labels", " ".join(f"{k}={v}" for k, v in node_info.labels.items()) or "-"),
            ("capabilities", " ".join(node_info.capabilities) or "-"),
            ("limits", " ".join(f"{k}={v}" for k, v in node_info.limits.items()) or "-"),
            ("protocol", str(node_info.protocol_version)),
            ("jumpstarter", node_info.jumpstarter_version or "-"),
        ]
    )
