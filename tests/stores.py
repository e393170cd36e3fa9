"""Store fixtures for both backends: SQLite always, PostgreSQL where a server answers.

Set JMP_TEST_POSTGRES_URL (``.ci/run`` does) to choose the server; with
JMP_REQUIRE_POSTGRES=1 an unreachable server fails the tests instead of skipping them.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest

POSTGRES_URL = os.environ.get("JMP_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")


def postgres_or_skip() -> str:
    try:
        import psycopg

        with psycopg.connect(POSTGRES_URL, connect_timeout=3):
            pass
    except Exception as exc:
        if os.environ.get("JMP_REQUIRE_POSTGRES"):
            pytest.fail(f"PostgreSQL required but not reachable at {POSTGRES_URL}: {exc}")
        pytest.skip(
            f"PostgreSQL not reachable at {POSTGRES_URL} ({type(exc).__name__}); "
            "set JMP_TEST_POSTGRES_URL=postgresql://user@host:port/db to run these"
        )
    return POSTGRES_URL


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A URL whose connections see only a fresh schema of their own."""
    import psycopg

    base = postgres_or_skip()
    schema = f"jmp_test_{secrets.token_hex(6)}"
    with psycopg.connect(base, autocommit=True) as db:
        db.execute(f"CREATE SCHEMA {schema}")
    sep = "&" if "?" in base else "?"
    try:
        yield f"{base}{sep}options={quote(f'-csearch_path={schema}')}"
    finally:
        with psycopg.connect(base, autocommit=True) as db:
            db.execute(f"DROP SCHEMA {schema} CASCADE")


def store_url(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    if kind == "sqlite":
        return f"sqlite:///{tmp_path / 'store.db'}"
    return request.getfixturevalue("postgres_url")
