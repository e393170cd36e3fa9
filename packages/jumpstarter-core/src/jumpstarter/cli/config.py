"""``jmp config show|path|init``: the configuration in effect, where it lives, a template."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import click

from ._base import fail, handle_errors
from ._output import format_option, print_json

_SECRET = re.compile(r"token|secret|password|passwd|api_?key", re.IGNORECASE)


@click.group()
def config() -> None:
    """The configuration: show it, locate it, or create one from a template.

    \b
    Lookup order: jmp --config PATH, $JMP_CONFIG, ./jumpstarter.toml, then the
    user config dir ('jmp config path' prints which). JMP_STORE, JMP_DATA_DIR
    and JMP_DEFAULT_NODE override the file.
    """


@config.command()
@format_option("toml", "json", help="toml for people (and as a config file); json for scripts (see README).")
@click.pass_obj
@handle_errors
def show(state, fmt) -> None:
    """Print the configuration in effect: the file, the defaults and the JMP_*
    overrides, with every path absolute.

    Tokens are never printed: a node's token_file is shown as the path it is.
    """
    from jumpstarter.config import NodeConfig, load_config, resolve_paths

    loaded = load_config(state.config_path)
    effective = resolve_paths(loaded)
    data = effective.model_dump(mode="json")
    if "local" not in data["nodes"]:  # always there; shown so the listing is whole
        data["nodes"]["local"] = NodeConfig(name="local").model_dump(mode="json")
    for node in [*data["nodes"].values(), *(v for v in data.values() if isinstance(v, dict) and "driver" in v)]:
        node.pop("name", None)  # the table's name says it
        node["options"] = _hide_secrets(node.get("options") or {})
    if fmt == "json":
        print_json({"source": str(loaded.source.absolute()) if loaded.source else None, **data})
        return
    source = f"{loaded.source.absolute()}, with" if loaded.source else "no config file; only"
    click.echo(f"# The configuration in effect ({source} defaults and JMP_* overrides).")
    click.echo(to_toml(data), nl=False)


def _hide_secrets(options: Mapping[str, Any]) -> dict[str, Any]:
    return {
        key: "<hidden>" if _SECRET.search(key) and isinstance(value, str) else
        _hide_secrets(value) if isinstance(value, Mapping) else value
        for key, value in options.items()
    }


def to_toml(data: Mapping[str, Any]) -> str:
    """The config as TOML: top-level values, then a table for each top-level mapping
    (``[nodes.NAME]`` for each node). None and empty tables are left out (TOML has
    no null); deeper mappings are inline tables."""
    lines = [f"{_key(k)} = {_value(v)}" for k, v in data.items() if not isinstance(v, Mapping) and v is not None]
    tables = [(k, v) for k, v in data.items() if isinstance(v, Mapping)]
    for key, table in tables:
        named = [(f"{key}.{_key(name)}", sub) for name, sub in table.items()] if key == "nodes" else [(key, table)]
        for header, items in named:
            body = [f"{_key(k)} = {_value(v)}" for k, v in items.items() if v is not None and v != {}]
            if body:
                lines += ["", f"[{_key(header) if key != 'nodes' else header}]", *body]
    return "\n".join(lines) + "\n"


def _key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else _string(key)


def _string(text: str) -> str:
    # A JSON string is a TOML basic string, but for DEL, which TOML wants escaped.
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        inner = ", ".join(f"{_key(k)} = {_value(v)}" for k, v in value.items() if v is not None)
        return "{ " + inner + " }" if inner else "{}"
    return _string(str(value))


@config.command()
@format_option("text", "json", help="text: the path; json: {\"path\": ..., \"exists\": ...}.")
@click.pass_obj
def path(state, fmt) -> None:
    """Print the config file in use, or where 'jmp config init' would write one."""
    from jumpstarter.config import find_config_file, user_config_path

    source = find_config_file(state.config_path)
    where = (source or user_config_path()).absolute()
    exists = where.is_file()
    if fmt == "json":
        print_json({"path": str(where), "exists": exists})
        return
    click.echo(str(where))
    if source is None:
        click.echo("jmp: no config file: the defaults are in use ('jmp config init' writes one here)", err=True)
    elif not exists:
        click.echo(f"jmp: {where} does not exist", err=True)


@config.command()
@click.option("--path", "target", type=click.Path(dir_okay=False, path_type=Path),
              help="Write here instead of the user config dir.")
@click.option("--force", is_flag=True, help="Replace a file that exists.")
def init(target: Path | None, force: bool) -> None:
    """Write a commented template config file (every key optional, commented out).

    To the user config dir ('jmp config path' shows it) unless --path says where.
    An existing file is left alone unless --force.
    """
    from jumpstarter.config import TEMPLATE, user_config_path

    target = target or user_config_path()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target, "w" if force else "x") as f:
            f.write(TEMPLATE)
    except FileExistsError:
        fail(f"{target} exists already; --force replaces it")
    except OSError as exc:
        fail(f"cannot write {target}: {exc.strerror}")
    click.echo(f"wrote {target}")
