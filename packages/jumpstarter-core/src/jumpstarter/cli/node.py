"""``jmp node``: the nodes, what they say of themselves, and serving one."""

from __future__ import annotations

import click

from ._base import JmpGroup


@click.group(
    cls=JmpGroup,
    commands={
        "info": ("jumpstarter.cli.node_info:info", "What a node says of itself (FetchConfig)."),
        "serve": ("jumpstarter.cli.node_serve:serve", "Serve this machine as a node to other machines."),
        "list": ("jumpstarter.cli.registry:node_list",
                 "Every registered node: free, leased, draining, unhealthy or offline."),
        "clear": ("jumpstarter.cli.registry:node_clear", "Mark an unhealthy node healthy again."),
        "remove": ("jumpstarter.cli.registry:node_remove", "Forget an offline node that will not come back."),
    },
)
def node() -> None:
    """Nodes: describe one, or serve this machine as one."""
