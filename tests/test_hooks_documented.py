"""Every hook a plugin can implement is documented and tested.

Fails when a hook in jumpstarter/hookspecs.py has no docstring saying when it is called
and what it returns, or when no test module (other than this one) names it. A test
that names a hook is expected to call it for real: a plugin implementing it, driven
through the core or the CLI.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
from jumpstarter import hookspecs

TESTS = Path(__file__).resolve().parent

HOOKS = sorted(
    name
    for name, fn in inspect.getmembers(hookspecs, inspect.isfunction)
    if hasattr(fn, "jmp_spec")
)


def test_the_hooks_are_found() -> None:
    assert {"jmp_register_transports", "jmp_register_node_drivers", "jmp_register_commands"} <= set(
        HOOKS
    )


@pytest.mark.parametrize("hook", HOOKS)
def test_the_hook_says_when_it_is_called_and_what_it_returns(hook: str) -> None:
    doc = inspect.getdoc(getattr(hookspecs, hook)) or ""
    assert re.search(r"\bcalled\b", doc, re.IGNORECASE), (
        f"{hook}: its docstring must say when it is called"
    )
    assert re.search(r"\breturns?\b", doc, re.IGNORECASE), (
        f"{hook}: its docstring must say what it returns"
    )


def _test_sources() -> dict[str, str]:
    return {
        path.name: path.read_text()
        for path in sorted(TESTS.glob("**/*.py"))
        if path.name.startswith("test_") and path.resolve() != Path(__file__).resolve()
    }


@pytest.mark.parametrize("hook", HOOKS)
def test_the_hook_is_exercised_by_a_test(hook: str) -> None:
    pattern = re.compile(rf"\b{hook}\b")
    naming = [name for name, source in _test_sources().items() if pattern.search(source)]
    assert naming, f"no test names {hook}: write one that implements it and calls it for real"
