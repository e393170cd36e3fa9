"""Plugins are found through the ``jmp.plugins`` entry points, and only there."""

from __future__ import annotations

import os
from importlib.metadata import entry_points
from pathlib import Path

import pytest
from jumpstarter import hookimpl
from jumpstarter.config import Config
from jumpstarter.errors import PluginError
from jumpstarter.plugins import get_plugin_manager
from jumpstarter.protocol import JumpStarterProtocol

from conftest import run_jmp


def make_broken_plugin(path: Path) -> Path:
    """A really installed (if tiny) distribution whose plugin module does not import."""
    dist = path / "brokenplug-1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: brokenplug\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[jmp.plugins]\nbroken = no_such_module_for_jmp\n")
    return path


def test_the_local_driver_comes_from_its_entry_point() -> None:
    (ep,) = [ep for ep in entry_points(group="jmp.plugins") if ep.name == "local"]
    assert ep.dist is not None and ep.dist.name == "jumpstarter-driver-local"
    plugins = get_plugin_manager(env={})
    assert plugins.transports["local"].plugin == "local"
    assert plugins.node_drivers["local"].plugin == "local"
    info = {i.name: i for i in plugins.entry_points}["local"]
    assert (info.distribution, info.error) == ("jumpstarter-driver-local", None)


def test_load_only_and_disable_switches() -> None:
    assert get_plugin_manager(env={"JMP_PLUGINS": ""}).transports == {}
    assert "local" in get_plugin_manager(env={"JMP_PLUGINS": "local"}).transports
    assert "local" not in get_plugin_manager(env={"JMP_DISABLE_PLUGINS": "local"}).transports
    assert get_plugin_manager(env={"JMP_DISABLE_PLUGINS": "local,grpc"}).transports == {}
    with pytest.raises(PluginError) as caught:
        get_plugin_manager(env={"JMP_PLUGINS": ""}).transport("local")
    assert str(caught.value) == (
        "unknown transport 'local'; installed: none (JMP_PLUGINS is set but empty: no plugin may load)"
    )


def test_a_broken_plugin_is_reported_by_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(make_broken_plugin(tmp_path / "site")))
    plugins = get_plugin_manager(env={})
    (failed,) = plugins.failed
    assert failed.name == "broken" and failed.distribution == "brokenplug"
    assert failed.error == "ModuleNotFoundError: No module named 'no_such_module_for_jmp'"
    assert "local" in plugins.transports  # the others still work
    with pytest.raises(PluginError, match=r"plugin 'broken' failed to load: ModuleNotFoundError"):
        plugins.transport("broken")


def test_a_broken_plugin_through_the_real_jmp(tmp_path: Path, data_dir: Path) -> None:
    site = make_broken_plugin(tmp_path / "site")
    env = {**os.environ, "PYTHONPATH": str(site)}
    done = run_jmp("run", "--", "echo", "still works", env=env)
    assert done.returncode == 0
    assert done.stdout == "still works\n"
    assert done.stderr == (
        "jmp: warning: plugin 'broken' failed to load: "
        "ModuleNotFoundError: No module named 'no_such_module_for_jmp'\n"
    )


def test_trace_switch_prints_hook_calls() -> None:
    lines: list[str] = []
    plugins = get_plugin_manager(env={"JMP_TRACE_PLUGINS": "1"}, trace=lines.append)
    plugins.transports
    assert lines[0] == "jmp: hook jmp_register_transports(register) -> [local]"
    assert lines[1] == "jmp: hook jmp_register_transports done"


def test_task_and_result_hooks_run_on_the_node(data_dir: Path) -> None:
    seen: list[tuple[str, str]] = []

    class Recorder:
        @hookimpl
        def jmp_task_created(self, task):
            seen.append(("created", task.state.value))

        @hookimpl
        def jmp_task_started(self, task):
            seen.append(("started", task.state.value))

        @hookimpl
        def jmp_task_finished(self, task):
            seen.append(("finished", task.state.value))

        @hookimpl
        def jmp_result_added(self, task, results):
            seen.append(("results", ",".join(r.name for r in results)))

        @hookimpl
        def jmp_session_connected(self, session, node):
            seen.append(("connected", node.name))

        @hookimpl
        def jmp_session_disconnected(self, session, node):
            seen.append(("disconnected", node.name))

    plugins = get_plugin_manager(env={}, extra=[Recorder()])
    protocol = JumpStarterProtocol(Config(data_dir=data_dir), plugins=plugins)
    with protocol.create_session("hooks") as session:
        task = session.connect().start(["true"])
        task.wait()
        session.add_results(task.id, [{"name": "a", "outcome": "passed"}, {"name": "b", "outcome": "failed"}])
    assert seen == [
        ("connected", "local"),
        ("created", "pending"),
        ("started", "running"),
        ("finished", "succeeded"),
        ("results", "a,b"),
        ("disconnected", "local"),
    ]


def test_a_plugin_registering_a_name_twice_is_refused() -> None:
    class Twice:
        @hookimpl
        def jmp_register_transports(self, register):
            register("local", object)

    plugins = get_plugin_manager(env={}, extra=[Twice()])
    with pytest.raises(PluginError, match="transport 'local' is registered twice: by plugin"):
        plugins.transports


def test_unknown_transport_in_config(data_dir: Path) -> None:
    config = Config.model_validate({"data_dir": str(data_dir), "nodes": {"lab": {"transport": "carrier-pigeon"}}})
    protocol = JumpStarterProtocol(config)
    with protocol.create_session("s") as session:
        with pytest.raises(PluginError, match="^unknown transport 'carrier-pigeon'; installed: grpc, local$"):
            session.connect("lab")


def test_a_typo_in_the_switches_is_reported() -> None:
    installed = ", ".join(sorted({ep.name for ep in entry_points(group="jmp.plugins")}))
    plugins = get_plugin_manager(env={"JMP_PLUGINS": "nosuch, local", "JMP_DISABLE_PLUGINS": "gprc"})
    assert plugins.warnings == [
        f"JMP_PLUGINS names no installed plugin 'nosuch' (installed: {installed})",
        f"JMP_DISABLE_PLUGINS names no installed plugin 'gprc' (installed: {installed})",
    ]
    assert plugins.failed == [] and "local" in plugins.transports
    assert get_plugin_manager(env={"JMP_PLUGINS": "local", "JMP_DISABLE_PLUGINS": "grpc"}).warnings == []


def test_an_unknown_name_says_which_switch_limited_loading() -> None:
    with pytest.raises(PluginError) as caught:
        get_plugin_manager(env={"JMP_PLUGINS": "nosuch"}).node_driver("local")
    assert str(caught.value) == "unknown node driver 'local'; installed: none (JMP_PLUGINS is set: only 'nosuch' may load)"
    with pytest.raises(PluginError) as caught:
        get_plugin_manager(env={"JMP_DISABLE_PLUGINS": "local,nosuch"}).transport("local")
    assert str(caught.value) == "unknown transport 'local'; installed: grpc (JMP_DISABLE_PLUGINS is set: 'local' may not load)"


def test_a_typo_in_jmp_plugins_through_the_real_jmp(data_dir: Path) -> None:
    done = run_jmp("run", "--", "true", env={**os.environ, "JMP_PLUGINS": "nosuch"})
    assert done.returncode == 1
    # The last line is the error; a warning naming the typo may come before it.
    assert done.stderr.splitlines()[-1] == (
        "jmp: error: unknown transport 'local'; installed: none (JMP_PLUGINS is set: only 'nosuch' may load)"
    )
