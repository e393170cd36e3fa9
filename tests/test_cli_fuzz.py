"""The CLI's arguments fuzzed with hypothesis, through click's runner: whatever a
person types, an error is one line on stderr and a non-zero exit, never a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jumpstarter.cli import cli

# Commands that only read, with the options that take a value; and `run` (of `true`
# only: the command is never drawn, so nothing random is executed).
READERS: dict[tuple[str, ...], list[str]] = {
    ("task", "status"): ["--node", "--format"],
    ("task", "list"): ["--node", "--session", "--state", "--limit", "--format"],
    ("task", "logs"): ["--node", "--from-offset", "--format"],
    ("task", "wait"): ["--node", "--format"],
    ("result", "query"): ["--task", "--session", "--node", "--outcome", "--name", "--since", "--until",
                          "--label", "--limit", "--cursor", "--format"],
    ("result", "history"): ["--session", "--limit", "--node", "--format"],
    ("result", "diff"): ["--node", "--format"],
    ("node", "info"): ["--node", "--format"],
}
RUN_OPTIONS = ["--node", "--session", "--duration", "--timeout", "--env", "--cwd", "--name", "--label",
               "--grace", "--wait"]

# Values people (and mistakes) type: numbers of every size, dates, K=V pairs,
# control characters and escape sequences, huge and empty strings.
values = st.one_of(
    st.text(max_size=30),
    st.text(st.characters(codec="utf-8"), min_size=1, max_size=5).map(lambda t: t * 4000),
    st.integers().map(str),
    st.sampled_from(["1e308", "-1", "0", "nan", "inf", "10" * 20, "999999999d", "0001-01-01", "9999-12-31T23:59",
                     "=", "a=b", "\x1b]0;x\x07", "\x00", "", " ", "--", "-", "%s", "{}", "'", "\\"]),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
)
positional = st.one_of(values, st.just("a" * 129), st.just("0123456789ab"))


def _short(text: object) -> str:
    text = str(text)
    return text if len(text) <= 400 else f"{text[:300]}… ({len(text)} characters)"


def _check(result) -> None:  # type: ignore[no-untyped-def]
    output = result.stdout + result.stderr
    assert "Traceback" not in output, _short(output)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(_short(f"{type(result.exception).__name__}: {result.exception}")) from None
    if result.exit_code != 0:
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("jmp: "), _short(result.stderr)
    else:
        assert result.stderr.count("\n") <= 1, _short(result.stderr)


@pytest.fixture
def runner(data_dir: Path) -> CliRunner:
    CliRunner().invoke(cli, ["run", "--session", "fuzz", "--", "true"])  # a store with a task in it
    return CliRunner()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_readers_answer_any_arguments_in_one_line(runner: CliRunner, data: st.DataObject) -> None:
    command = data.draw(st.sampled_from(sorted(READERS)))
    options = data.draw(st.lists(st.tuples(st.sampled_from(READERS[command]), values), max_size=4))
    args = [*command, *(part for pair in options for part in pair)]
    args += data.draw(st.lists(positional, max_size=2))
    _check(runner.invoke(cli, args))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(options=st.lists(st.tuples(st.sampled_from(RUN_OPTIONS), values), min_size=1, max_size=3))
def test_run_answers_any_options_in_one_line(runner: CliRunner, options: list[tuple[str, str]]) -> None:
    _check(runner.invoke(cli, ["run", *(part for pair in options for part in pair), "--", "true"]))
