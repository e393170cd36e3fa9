"""Configuration: one TOML file, validated by pydantic, overridden by ``JMP_*``.

Where the file is looked for, first found wins:

1. the path given explicitly (``jmp --config``, ``JumpStarterProtocol(config_path=…)``)
2. ``$JMP_CONFIG``
3. ``./jumpstarter.toml``
4. ``<user config dir>/jumpstarter/config.toml`` (``jmp config path`` prints it)

With no file at all the defaults hold: one node, ``local``, and a SQLite store in the
user data dir. Top-level keys are overridden by ``JMP_<KEY>`` environment variables
(``JMP_STORE``, ``JMP_DATA_DIR``, ``JMP_DEFAULT_NODE``).
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import platformdirs
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from jumpstarter.errors import ConfigError

APP_NAME = "jumpstarter"
ENV_OVERRIDES = ("store", "data_dir", "default_node")


POWER_STEPS = {"power on": "on", "power off": "off", "power cycle": "cycle"}
"""The lease hook steps that switch the node's board, and the power action of each
(see :mod:`jumpstarter.node.hooks`)."""


def power_step(step: str) -> str | None:
    """The power action a lease hook step asks for (``"power off"`` -> ``"off"``), or
    None for a shell command."""
    return POWER_STEPS.get(" ".join(step.split()))


class UnknownNode(ConfigError):
    """Raised when a node name is neither configured nor the built-in ``local``."""


class NodeConfig(BaseModel):
    """How to reach one node, and, for a node this process serves, how to run work."""

    model_config = ConfigDict(extra="forbid")

    name: str = ""
    transport: str = Field(default="local", description="transport plugin that reaches it")
    driver: str = Field(default="local", description="node driver, where this process serves it")
    endpoint: str | None = None
    token_file: Path | None = None
    tls_ca: Path | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    options: dict[str, Any] = Field(default_factory=dict, description="passed to the driver")
    files_root: Path | None = Field(
        default=None, description="where this node may put and fetch files; default: anywhere its user may"
    )
    max_transfer: int | None = Field(default=None, gt=0, description="bytes one file transfer may carry")
    keep_output_for: float | None = Field(
        default=None, gt=0, description="seconds a finished task's output is kept (default: for ever)"
    )
    keep_output_bytes: int | None = Field(
        default=None, ge=0, description="most bytes of finished tasks' output kept, oldest deleted first"
    )
    before_lease: str | list[str] | None = Field(
        default=None,
        description='run before each lease (node side): a shell command, or steps such as ["power on", "./wait.sh"]',
    )
    after_lease: str | list[str] | None = Field(
        default=None, description='run after each lease (node side): a shell command, or steps such as ["power off"]'
    )
    hook_timeout: float = Field(default=300.0, gt=0, description="seconds a lease hook may take")
    power: dict[str, Any] | None = Field(
        default=None, description='how the board is powered: {driver = "command", on = [...], ...}'
    )

    @field_validator("before_lease", "after_lease", mode="before")
    @classmethod
    def _hook_is_a_command_or_steps(cls, hook: Any) -> Any:
        if hook is None or isinstance(hook, str):
            return hook
        if not isinstance(hook, list):
            raise ValueError(f'expected a shell command or a list of steps such as ["power off"], got {hook!r}')
        for number, step in enumerate(hook, 1):
            if not (isinstance(step, str) and step.strip()):
                raise ValueError(f"step {number}: expected a shell command or a power step, got {step!r}")
            if step.split()[0] == "power" and power_step(step) is None:
                raise ValueError(
                    f"step {number}: {step!r} is no power step; use 'power on', 'power off' or 'power cycle'"
                )
        return hook

    @field_validator("power")
    @classmethod
    def _power_names_a_driver(cls, power: dict[str, Any] | None) -> dict[str, Any] | None:
        if power is not None and not (isinstance(power.get("driver"), str) and power["driver"]):
            raise ValueError('name the power driver: power = {driver = "command", ...}')
        return power


class RegistryConfig(BaseModel):
    """How to reach nodes leased by label from the shared registry (``[registry]``)."""

    model_config = ConfigDict(extra="forbid")

    token_file: Path | None = None
    tls_ca: Path | None = None
    options: dict[str, Any] = Field(default_factory=dict, description="passed to the transport")


_REACHING_ONLY = {"name", "token_file", "tls_ca", "labels", "options"}
"""What a config entry for a node the registry describes may hold: how to reach it."""


class Config(BaseModel):
    """The whole configuration. ``source`` is the file it came from, if any."""

    model_config = ConfigDict(extra="forbid")

    default_node: str = "local"
    store: str | None = Field(default=None, description="store URL; default: SQLite in data_dir")
    data_dir: Path | None = Field(default=None, description="task output and the SQLite store")
    nodes: dict[str, NodeConfig] = Field(default_factory=dict)
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    source: Path | None = Field(default=None, exclude=True)
    from_env: dict[str, str] = Field(default_factory=dict, exclude=True)  # key -> variable

    def model_post_init(self, _context: Any) -> None:
        for name, node in self.nodes.items():
            node.name = name

    @property
    def data_path(self) -> Path:
        return self.data_dir or Path(platformdirs.user_data_dir(APP_NAME))

    @property
    def store_url(self) -> str:
        return self.store or f"sqlite:///{self.data_path / 'jumpstarter.db'}"

    def node(self, name: str | None = None) -> NodeConfig:
        """The config of node ``name`` (default: ``default_node``). ``local`` is always
        known, even when no file names it."""
        default = name is None
        name = name or self.default_node
        if name in self.nodes:
            return self.nodes[name]
        if name == "local":
            return NodeConfig(name="local")
        known = ", ".join(sorted({"local", *self.nodes}))
        if default and "default_node" in self.from_env:
            where = f" (from {self.from_env['default_node']})"
        elif default and self.source:
            where = f" (default_node in {self.source})"
        else:
            where = f" in {self.source}" if self.source else ""
        raise UnknownNode(f"unknown node {name!r}{where}; known nodes: {known}")

    def is_complete(self, node: NodeConfig) -> bool:
        """True when ``node`` says how it is reached or run here: a ``transport``,
        ``endpoint`` or ``driver`` of its own, a setting only a node served here has
        (``files_root``, ``power``, lease hooks…), or it is ``local``. An entry holding
        only credentials, labels or transport options is for a node the registry
        describes."""
        own = node.model_fields_set
        return node.name == "local" or bool(own & {"transport", "endpoint", "driver"} or own - _REACHING_ONLY)

    def registered_node(
        self, name: str, *, transport: str, endpoint: str | None, driver: str, labels: dict[str, str]
    ) -> NodeConfig:
        """How to reach the node ``name`` that the registry describes: its transport
        and endpoint from there, its credentials from ``[registry]``, each overridden
        by a ``[nodes.NAME]`` entry that sets it."""
        entry = self.nodes.get(name)
        own = entry.model_fields_set if entry is not None else set()
        registry = self.registry
        return NodeConfig(
            name=name,
            transport=transport,
            driver=driver,
            endpoint=endpoint,
            token_file=entry.token_file if entry is not None and "token_file" in own else registry.token_file,
            tls_ca=entry.tls_ca if entry is not None and "tls_ca" in own else registry.tls_ca,
            labels=labels,
            options={**registry.options, **(entry.options if entry is not None else {})},
        )

    @property
    def shared_store(self) -> bool:
        """True for a ``postgresql://`` store: the one that holds the lab's registry."""
        return self.store_url.startswith(("postgresql://", "postgres://"))


def user_config_path() -> Path:
    return Path(platformdirs.user_config_dir(APP_NAME)) / "config.toml"


def find_config_file(path: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None) -> Path | None:
    """The file :func:`load_config` would read, or None for defaults only."""
    env = os.environ if env is None else env
    if path is not None:
        return Path(path)
    if env.get("JMP_CONFIG"):
        return Path(env["JMP_CONFIG"])
    for candidate in (Path("jumpstarter.toml"), user_config_path()):
        if candidate.is_file():
            return candidate
    return None


def load_config(
    path: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None
) -> Config:
    """Find, read and validate the configuration. Raises :class:`ConfigError` naming
    the file and key of the first problem."""
    env = os.environ if env is None else env
    source = find_config_file(path, env)
    data: dict[str, Any] = {}
    if source is not None:
        try:
            with open(source, "rb") as f:
                data = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {source}") from None
        except OSError as exc:
            raise ConfigError(f"cannot read config file {source}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{source}: invalid TOML: {exc}") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(
                f"{source}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start})"
            ) from None
        except RecursionError:
            raise ConfigError(f"{source}: invalid TOML: arrays or tables nested too deeply") from None
    from_env = {}
    for key in ENV_OVERRIDES:
        value = env.get(f"JMP_{key.upper()}")
        if value:
            data[key] = value
            from_env[key] = f"JMP_{key.upper()}"
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        key = ".".join(str(part) for part in error["loc"])
        where = source or "environment"
        message = str(error["msg"]).removeprefix("Value error, ")  # a check of ours: its own words
        raise ConfigError(f"{where}: {key}: {message}") from None
    config.source = source
    config.from_env = from_env
    return config


def resolve_paths(config: Config) -> Config:
    """A copy of ``config`` with its defaults filled in and every path absolute
    (``data_dir``, a SQLite ``store``, the paths of each node), so a process started
    elsewhere (``jmp config show``, a detached task's agent running in ``/``) reads
    the same files."""

    def absolute(path: Path) -> Path:
        return Path(os.path.abspath(path))

    def node_paths(node: NodeConfig) -> NodeConfig:
        paths = {k: absolute(v.expanduser()) for k, v in node.__dict__.items() if isinstance(v, Path)}
        return node.model_copy(update=paths)

    store = config.store_url
    if store.startswith("sqlite:///"):
        store = "sqlite:///" + str(absolute(Path(store.removeprefix("sqlite:///"))))
    elif "://" not in store:
        store = str(absolute(Path(store)))
    update: dict[str, Any] = {"data_dir": absolute(config.data_path), "store": store}
    for key, value in config.__dict__.items():  # nodes, and any other node-shaped settings
        if isinstance(value, NodeConfig | RegistryConfig):
            update[key] = node_paths(value)
        elif isinstance(value, dict) and value and all(isinstance(v, NodeConfig) for v in value.values()):
            update[key] = {name: node_paths(node) for name, node in value.items()}
    return config.model_copy(update=update)


TEMPLATE = """\
# Jumpstarter configuration. Every key is optional.

# default_node = "local"
# store = "sqlite:////var/lib/jumpstarter/jumpstarter.db"
# data_dir = "/var/lib/jumpstarter"

# The local node is always there; name it here to give it labels or driver options.
# [nodes.local]
# transport = "local"
# driver = "local"
# labels = { site = "desk" }
"""
