"""One line for every bad input: the exact message, a non-zero exit, no traceback,
and the store as it was. Names holding terminal escapes are shown escaped."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import invoke_jmp, run_jmp
from jumpstarter.cli import cli


def _one_line(code: int, stdout: str, stderr: str, expected: str, exit_code: int) -> None:
    assert "Traceback" not in stderr + stdout
    assert (code, stdout, stderr) == (exit_code, "", f"jmp: error: {expected}\n")


def _store_rows(data_dir: Path) -> dict[str, int]:
    path = data_dir / "store.db"
    if not path.exists():
        return {}
    with sqlite3.connect(path) as db:
        return {t: db.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in ("sessions", "tasks", "results")}


@pytest.mark.parametrize("how", ["runner", "process"])
def test_config_files_that_are_not_toml_text(how: str, data_dir: Path, tmp_path: Path) -> None:
    latin = tmp_path / "latin1.toml"
    latin.write_bytes(b'[nodes.caf\xe9]\ntransport = "local"\n')
    deep = tmp_path / "deep.toml"
    deep.write_text("a = " + "[" * 10_000 + "]" * 10_000 + "\n")
    _one_line(*invoke_jmp(how, ["--config", str(latin), "task", "list"]),
              f"{latin}: not UTF-8 text (byte 0xe9 at offset 10)", 1)
    _one_line(*invoke_jmp(how, ["--config", str(deep), "task", "list"]),
              f"{deep}: invalid TOML: arrays or tables nested too deeply", 1)


def test_a_sqlite_file_of_another_application_is_not_touched(data_dir: Path, tmp_path: Path) -> None:
    other = tmp_path / "app.db"
    with sqlite3.connect(other) as db:
        db.execute("CREATE TABLE tasks (title TEXT)")  # a to-do app: same table name
        db.execute("CREATE TABLE notes (body TEXT)")
    before = other.read_bytes()
    for args in (["task", "list"], ["run", "--", "true"], ["result", "query"]):
        done = run_jmp(*args, env={**__import__("os").environ, "JMP_STORE": str(other)})
        _one_line(done.returncode, done.stdout, done.stderr,
                  f"the store {other} is not a Jumpstarter store: it holds another application's tables (notes, tasks)", 1)
    assert other.read_bytes() == before
    junk = tmp_path / "junk.db"
    junk.write_text("not a database at all, but long enough to have a header" * 4)
    done = run_jmp("task", "list", env={**__import__("os").environ, "JMP_STORE": str(junk)})
    _one_line(done.returncode, done.stdout, done.stderr, f"cannot open the store {junk}: file is not a database", 1)


def test_out_of_range_ages_cursors_ids_and_names(data_dir: Path) -> None:
    runner = CliRunner()
    runner.invoke(cli, ["run", "--session", "keep", "--", "true"])
    before = _store_rows(data_dir)

    def check(args: list[str], expected: str, exit_code: int) -> None:
        result = runner.invoke(cli, args)
        _one_line(result.exit_code, result.stdout, result.stderr, expected, exit_code)

    check(["result", "query", "--since", "999999999d"],
          "Invalid value for '--since': '999999999d' is too far in the past or future for a date "
          "(try 'jmp result query --help')", 2)
    check(["result", "query", "--cursor", str(10**30)],
          "invalid cursor '1000000000000000000000000000000': use the next_cursor of a page", 2)
    check(["task", "status", "a" * 10_000],
          f"invalid task id '{'a' * 39}…': 10000 characters, at most 128", 2)
    check(["run", "--session", "s" * 100_000, "--", "true"],
          f"invalid session name '{'s' * 39}…': 100000 characters, at most 512", 2)
    assert _store_rows(data_dir) == before


def test_a_name_with_a_byte_that_is_not_utf8_leaves_no_trace(data_dir: Path) -> None:
    # A real process, so the byte 0xff arrives as the kernel gives it.
    import os
    import subprocess

    from conftest import JMP

    run_jmp("run", "--session", "keep", "--", "true")
    before = _store_rows(data_dir)
    for args in ([b"run", b"--name", b"bad\xff", b"--", b"true"],
                 [b"run", b"--session", b"bad\xff", b"--", b"true"],
                 [b"run", b"--", b"echo", b"bad\xff"]):
        done = subprocess.run([os.fsencode(JMP), *args], capture_output=True, timeout=60)
        assert (done.returncode, done.stdout, done.stderr) == (
            2, b"", b"jmp: error: argument 'bad\\xff' is not valid UTF-8 text\n"
        )
    assert _store_rows(data_dir) == before  # no orphan session row


def test_an_unreachable_postgresql_is_one_line_at_once(data_dir: Path) -> None:
    import os
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"postgresql://nobody@127.0.0.1:{port}/test"
    started = time.monotonic()
    done = run_jmp("task", "list", env={**os.environ, "JMP_STORE": url}, timeout=30)
    waited = time.monotonic() - started
    _one_line(done.returncode, done.stdout, done.stderr,
              f'cannot open the store {url}: connection failed: connection to server at "127.0.0.1", '
              f"port {port} failed: Connection refused", 1)
    assert waited < 8  # a bound, not a timing claim: the pool used to retry for 10 s


def test_names_with_terminal_escapes_are_shown_escaped_and_stored_as_they_are(data_dir: Path) -> None:
    evil = "evil\x1b]0;pwned\x07\nname"
    shown = "evil\\x1b]0;pwned\\x07\\nname"
    runner = CliRunner()
    runner.invoke(cli, ["run", "--session", evil, "--name", evil, "--", "true"])
    task_id = json.loads(runner.invoke(cli, ["task", "list", "--format", "json"]).stdout)["tasks"][0]["id"]
    added = runner.invoke(cli, ["result", "add", task_id, "--name", evil, "--outcome", "failed", "--message", evil])
    assert added.exit_code == 0, added.stderr
    for args in (["task", "list"], ["task", "status", task_id], ["result", "query"],
                 ["result", "history", evil], ["result", "query", "--session", evil]):
        out = runner.invoke(cli, args).stdout
        assert "\x1b" not in out and "\x07" not in out, args
        assert shown in out, args
    # Stored as they are: scripts get them exactly.
    doc = json.loads(runner.invoke(cli, ["task", "status", "--format", "json", task_id]).stdout)
    assert doc["name"] == evil
    results = json.loads(runner.invoke(cli, ["result", "query", "--format", "json"]).stdout)["results"]
    assert [(r["name"], r["message"]) for r in results] == [(evil, evil)]
