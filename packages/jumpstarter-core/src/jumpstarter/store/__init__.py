"""The store: sessions, tasks and results, and the registry of a shared lab.

Runs on the node side (and in the CLI for commands that only read). One schema and
one set of queries (:mod:`jumpstarter.store.schema`, :mod:`jumpstarter.store.sql`)
serve both back ends: SQLite, embedded (:mod:`jumpstarter.store.sqlite`), and
PostgreSQL, shared by many machines (:mod:`jumpstarter.store.postgres`, with the node
registry and leases in :mod:`jumpstarter.store.registry`). Imports nothing of the
client, the node or the CLI.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from jumpstarter._lazy import lazy_exports

_EXPORTS = {
    "Store": "jumpstarter.store.base",
    "open_store": "jumpstarter.store.base",
    "RepeatedBatch": "jumpstarter.store.base",
    "SQLiteStore": "jumpstarter.store.sqlite",
    "PostgresStore": "jumpstarter.store.postgres",
    "NodeRegistry": "jumpstarter.store.registry",
}
__all__ = list(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:
    from jumpstarter.store.base import RepeatedBatch, Store, open_store
    from jumpstarter.store.postgres import PostgresStore
    from jumpstarter.store.registry import NodeRegistry
    from jumpstarter.store.sqlite import SQLiteStore
