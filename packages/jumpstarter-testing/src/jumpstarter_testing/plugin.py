"""pytest plugin (entry point ``pytest11``): record every test of a run as a
Jumpstarter result.

::

    pytest --jmp-session nightly [--jmp-node lab1]

opens the session ``nightly`` on the node (default: the config's ``default_node``),
records the pytest run there as one task (state ``running`` while pytest runs, then
``succeeded``, ``failed`` or ``stopped`` by pytest's exit status) and every test as
one result of that task: the node id as its name (whole, however long), its outcome
(``passed failed skipped error xfail xpass``; an error in setup or teardown is
``error``, unless the test itself failed), its duration (setup + call + teardown, as
pytest's JUnit report counts it) and a trimmed failure message. Under
pytest-rerunfailures each run is one of the result's ``attempts`` and the last run
is its outcome: ``flaky`` when a run failed and the last did not. ``record_property``
values become labels, numbers metrics (a name recorded twice: ``NAME``, ``NAME[2]``).
A module that cannot be collected (or is skipped whole) is one result, however many
collectors report it (``--doctest-modules``, xdist workers). pytest's own JUnit file
of the same run, imported with ``jmp result import``, gives the same names and
outcomes. Results are sent in batches while the run goes (at least every second),
so a run killed halfway keeps what it recorded; its task then ends ``lost``.

Fixtures, with or without ``--jmp-session``: ``jmp_session`` (the session, blocking
API) and ``jmp_node`` (the node, connected with its lease, for tests that start tasks
on it).

Without ``--jmp-session`` the plugin is inert: this module imports nothing beyond
pytest and registers no per-test hook; the recorder lives in
:mod:`jumpstarter_testing._recorder`, imported only when asked for.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from jumpstarter.client.sync import Node, Session

RECORDER = "jumpstarter-recorder"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("jumpstarter", "Jumpstarter: record the tests as results")
    group.addoption(
        "--jmp-session",
        metavar="NAME",
        help="Record every test as a result in the Jumpstarter session NAME.",
    )
    group.addoption(
        "--jmp-node",
        metavar="NODE",
        help="Node to record on and to give the jmp_node fixture (default: the config's default_node).",
    )


def pytest_configure(config: pytest.Config) -> None:
    name = config.getoption("jmp_session")
    if name is None:
        return
    if hasattr(config, "workerinput"):
        return  # a pytest-xdist worker: its reports reach the controller, which records them
    if config.getoption("collectonly") or config.getoption("help"):
        return
    from ._recorder import Recorder

    recorder = Recorder(config, name, config.getoption("jmp_node"))
    recorder.open()  # a bad node or config stops pytest here, as a usage error
    config.pluginmanager.register(recorder, RECORDER)
    config.add_cleanup(recorder.close)


@pytest.fixture(scope="session")
def jmp_session(request: pytest.FixtureRequest) -> Iterator[Session]:
    """The Jumpstarter session of this run (:class:`jumpstarter.client.sync.Session`): the
    one results are recorded in with ``--jmp-session``, else a session named
    ``pytest`` opened for the tests that ask for it."""
    recorder: Any = request.config.pluginmanager.get_plugin(RECORDER)
    if recorder is not None:
        yield recorder.session
        return
    from jumpstarter.protocol import JumpStarterProtocol

    with JumpStarterProtocol().create_session("pytest") as session:
        yield session


@pytest.fixture(scope="session")
def jmp_node(jmp_session: Session, request: pytest.FixtureRequest) -> Iterator[Node]:
    """The node of this run (``--jmp-node``, default: the config's default node),
    connected with its lease taken, so tests can start tasks on it
    (:class:`jumpstarter.client.sync.Node`)."""
    node = jmp_session.connect(request.config.getoption("jmp_node"))
    yield node
    node.release()
