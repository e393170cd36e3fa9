"""Shell completion of task ids, node names and session names (click's
``shell_complete``), read from the configuration and the store.

A completion runs on every Tab: it reads, never writes (a store that does not exist
yet is not created), and it never fails aloud: whatever goes wrong, it offers
nothing.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import click
from click.shell_completion import CompletionItem

LIMIT = 200
"""Newest tasks or sessions offered at most."""


def _config(ctx: click.Context) -> Any:
    from jumpstarter.config import load_config

    root = ctx.find_root()
    return load_config(root.params.get("config_path"))


def _from_store(ctx: click.Context, read: Callable[[Any], Awaitable[list[Any]]]) -> list[Any]:
    try:
        import anyio

        from jumpstarter.store.base import open_store

        url = _config(ctx).store_url
        if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).exists():
            return []

        async def main() -> list[Any]:
            store = open_store(url)
            await store.open()
            try:
                return await read(store)
            finally:
                await store.aclose()

        return anyio.run(main)
    except Exception:  # a completion offers nothing rather than a traceback
        return []


def complete_task(
    ctx: click.Context, param: click.Parameter, incomplete: str
) -> list[CompletionItem]:
    """Task ids of the store, newest first, with their names as help."""
    tasks = _from_store(ctx, lambda store: store.list_tasks(limit=LIMIT))
    return [
        CompletionItem(t.id, help=t.name or " ".join(t.spec.command)[:60])
        for t in tasks
        if t.id.startswith(incomplete)
    ]


def complete_session(
    ctx: click.Context, param: click.Parameter, incomplete: str
) -> list[CompletionItem]:
    """Session names of the store, each once, newest first."""
    sessions = _from_store(ctx, lambda store: store.list_sessions(with_results=False, limit=LIMIT))
    names = dict.fromkeys(s.name for s in sessions if s.name.startswith(incomplete))
    return [CompletionItem(name) for name in names]


def complete_node(
    ctx: click.Context, param: click.Parameter, incomplete: str
) -> list[CompletionItem]:
    """Node names of the configuration (``local`` always)."""
    try:
        names = sorted({"local", *_config(ctx).nodes})
    except Exception:
        return []
    return [CompletionItem(name) for name in names if name.startswith(incomplete)]
