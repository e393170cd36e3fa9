"""The one schema of both stores: its tables and indexes, as numbered migrations.

Migration N is applied, in one transaction, to a store whose schema version is below
N (SQLite keeps the version in ``PRAGMA user_version``, PostgreSQL in a table
``jmp_schema``). Append a migration; never edit one that has shipped. Where the two
back ends spell a type differently, the text says ``{name}`` and :data:`SQLITE_TYPES`
and :data:`POSTGRES_TYPES` fill it in.
"""

from __future__ import annotations

from collections.abc import Mapping

SQLITE_TYPES = {
    "real": "REAL",
    "bigint": "INTEGER",
    "serial_key": "INTEGER PRIMARY KEY",  # the rowid: numbered in order of insertion
    "json": "TEXT",
    "name_pattern": "name",
    # SQLite indexes a value of any length: its index on names stays as it is.
    "long_names": "CREATE INDEX IF NOT EXISTS results_name ON results (name, created_at)",
}
POSTGRES_TYPES = {
    "real": "DOUBLE PRECISION",
    "bigint": "BIGINT",
    "serial_key": "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY",
    "json": "JSONB",
    "name_pattern": "name text_pattern_ops",  # LIKE 'prefix%' and regexes use it
    # A B-tree entry holds at most about 2.7 kB, and result names have no limit: look
    # names up by their hash instead (exact names: history, diff).
    "long_names": "DROP INDEX results_name; CREATE INDEX results_name ON results USING hash (name)",
}

_MIGRATIONS = [
    # 1: sessions, tasks, results.
    """
    CREATE TABLE sessions (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        client TEXT,
        created_at {real} NOT NULL
    );
    CREATE INDEX sessions_name ON sessions (name);

    CREATE TABLE tasks (
        id TEXT PRIMARY KEY,
        node TEXT NOT NULL,
        session_id TEXT REFERENCES sessions (id),
        name TEXT,
        spec TEXT NOT NULL,
        state TEXT NOT NULL,
        exit_code INTEGER,
        message TEXT,
        labels TEXT,
        created_at {real} NOT NULL,
        started_at {real},
        finished_at {real},
        pid INTEGER,
        agent TEXT
    );
    CREATE INDEX tasks_session ON tasks (session_id, created_at);
    CREATE INDEX tasks_node_state ON tasks (node, state);
    CREATE INDEX tasks_created ON tasks (created_at);

    CREATE TABLE results (
        id {serial_key},
        task_id TEXT NOT NULL REFERENCES tasks (id),
        session_id TEXT,
        node TEXT,
        name TEXT NOT NULL,
        outcome TEXT NOT NULL,
        duration {real},
        message TEXT,
        metrics TEXT,
        labels {json},
        started_at {real},
        finished_at {real},
        created_at {real} NOT NULL
    );
    CREATE INDEX results_task ON results (task_id, outcome);
    CREATE INDEX results_session ON results (session_id, outcome);
    CREATE INDEX results_name ON results ({name_pattern}, created_at);
    CREATE INDEX results_created ON results (created_at);
    """,
    # 2: the node registry and leases by selector (used where the store is shared).
    """
    CREATE TABLE nodes (
        name TEXT PRIMARY KEY,
        labels {json} NOT NULL DEFAULT '{{}}',
        endpoint TEXT,
        transport TEXT NOT NULL,
        driver TEXT NOT NULL,
        agent TEXT,
        registered_at {real} NOT NULL,
        last_seen {real} NOT NULL
    );

    CREATE TABLE leases (
        id {serial_key},
        node TEXT NOT NULL REFERENCES nodes (name),
        session_id TEXT NOT NULL,
        session_name TEXT NOT NULL,
        holder TEXT,
        since {real} NOT NULL,
        expires_at {real},
        keepalive_at {real} NOT NULL,
        ended_at {real},
        end_reason TEXT,
        request_id {bigint}
    );
    -- The schema itself forbids two live leases on one node.
    CREATE UNIQUE INDEX leases_one_live_per_node ON leases (node) WHERE ended_at IS NULL;
    CREATE INDEX leases_session ON leases (session_id) WHERE ended_at IS NULL;

    CREATE TABLE lease_requests (
        id {serial_key},
        selector {json} NOT NULL,
        session_id TEXT NOT NULL,
        session_name TEXT NOT NULL,
        holder TEXT,
        duration {real},
        requested_at {real} NOT NULL,
        keepalive_at {real} NOT NULL,
        lease_id {bigint} REFERENCES leases (id)
    );
    """,
    # 3: what JUnit files and test runners say beyond the outcome.
    """
    ALTER TABLE results ADD COLUMN flaky INTEGER;
    ALTER TABLE results ADD COLUMN attempts TEXT;
    ALTER TABLE results ADD COLUMN file TEXT;
    ALTER TABLE results ADD COLUMN line INTEGER;
    """,
    # 4: result batches by the id their client chose, so a batch sent again (its reply
    # was lost) is answered with the ids it got, not stored twice. ``ids`` is a JSON
    # list of [first, last] runs: a batch's ids are one run unless another writer's
    # rows came between.
    """
    CREATE TABLE result_batches (
        id TEXT PRIMARY KEY,
        task_id TEXT NOT NULL REFERENCES tasks (id),
        ids TEXT NOT NULL,
        created_at {real} NOT NULL
    );
    """,
    # 5: the files a task left on its node, fetched after it (jmp run --get).
    """
    CREATE TABLE artifacts (
        id {serial_key},
        task_id TEXT NOT NULL REFERENCES tasks (id),
        path TEXT NOT NULL,
        size {bigint} NOT NULL,
        sha256 TEXT NOT NULL,
        created_at {real} NOT NULL
    );
    CREATE INDEX artifacts_task ON artifacts (task_id);
    """,
    # 6: result names of any length (a pytest parameter id can be long).
    """
    {long_names};
    """,
    # 7: lease hooks: a node whose hook failed is unhealthy (the hook's error), and a
    # node running its after_lease hook goes to no one meanwhile.
    """
    ALTER TABLE nodes ADD COLUMN unhealthy TEXT;
    ALTER TABLE nodes ADD COLUMN hook_running INTEGER NOT NULL DEFAULT 0;
    -- What runs on each node: a node is leased to no one else while another session's task runs.
    CREATE INDEX tasks_running ON tasks (node, session_id) WHERE state = 'running';
    """,
]

VERSION = len(_MIGRATIONS)
"""The schema version this Jumpstarter writes and knows."""


def migrations(types: Mapping[str, str]) -> list[list[str]]:
    """Every migration, in order, as its statements spelled with ``types``
    (:data:`SQLITE_TYPES` or :data:`POSTGRES_TYPES`)."""
    return [_statements(text.format(**types)) for text in _MIGRATIONS]


def _statements(script: str) -> list[str]:
    lines = [line for line in script.splitlines() if not line.strip().startswith("--")]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]
