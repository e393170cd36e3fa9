"""Config: where it is found, how it is checked, what the environment overrides."""

from __future__ import annotations

from pathlib import Path

import pytest
from jumpstarter.config import ConfigError, UnknownNode, load_config


def test_defaults_without_any_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    config = load_config(env={})
    assert config.source is None
    assert config.node().name == "local" and config.node().transport == "local"
    assert config.store_url.startswith("sqlite:////") and config.store_url.endswith("jumpstarter.db")


def test_lookup_order_and_env_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "jumpstarter.toml").write_text('default_node = "lab"\n[nodes.lab]\nlabels = {board = "rpi4"}\n')
    explicit = tmp_path / "other.toml"
    explicit.write_text('default_node = "local"\n')
    assert load_config(env={}).node().labels == {"board": "rpi4"}
    assert load_config(env={"JMP_CONFIG": str(explicit)}).default_node == "local"
    assert load_config(explicit, env={"JMP_CONFIG": "/nope"}).source == explicit
    overridden = load_config(env={"JMP_STORE": "sqlite:////tmp/x.db", "JMP_DEFAULT_NODE": "local"})
    assert overridden.store_url == "sqlite:////tmp/x.db" and overridden.default_node == "local"


def test_malformed_toml_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("default_node = \n")
    with pytest.raises(ConfigError, match=rf"^{path}: invalid TOML: Invalid value \(at line 1, column 16\)$"):
        load_config(path, env={})


def test_a_bad_key_names_the_file_and_the_key(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[nodes.lab]\ntransport = "grpc"\nlabels = {board = 4}\n')
    with pytest.raises(ConfigError, match=rf"^{path}: nodes.lab.labels.board: Input should be a valid string$"):
        load_config(path, env={})
    path.write_text("colour = 'blue'\n")
    with pytest.raises(ConfigError, match=rf"^{path}: colour: Extra inputs are not permitted$"):
        load_config(path, env={})


def test_missing_and_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=f"^config file not found: {tmp_path}/nope.toml$"):
        load_config(tmp_path / "nope.toml", env={})
    with pytest.raises(ConfigError, match=f"^config file not found: {tmp_path}/env.toml$"):
        load_config(env={"JMP_CONFIG": str(tmp_path / "env.toml")})
    with pytest.raises(ConfigError, match=f"^cannot read config file {tmp_path}: Is a directory$"):
        load_config(tmp_path, env={})


def test_unknown_node(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[nodes.lab1]\n")
    with pytest.raises(UnknownNode, match=rf"^unknown node 'lab2' in {path}; known nodes: lab1, local$"):
        load_config(path, env={}).node("lab2")
