"""A node's ``options`` for the ssh driver, checked when the driver is made."""

from __future__ import annotations

import getpass
from pathlib import Path
from typing import Any

from jumpstarter.errors import ConfigError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

SECRET_OPTIONS = ("password", "passphrase", "key", "private_key")
"""Options that would hold a secret in the config itself: refused, so no secret ever
shows in ``jmp config show``, a log or a process listing."""


class SshOptions(BaseModel):
    """How to reach and log in to the SSH host of one node."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = Field(min_length=1)
    port: int = Field(default=22, ge=1, le=65535)
    user: str = Field(default_factory=getpass.getuser, min_length=1)
    key_file: list[Path] = Field(default_factory=list)
    """Private key files; none given: the default keys of ``~/.ssh``."""
    agent: bool = True
    """Offer the keys of the SSH agent (``$SSH_AUTH_SOCK``)."""
    password_file: Path | None = None
    """A file whose first line is the password (keep it mode 600)."""
    known_hosts: Path = Path("~/.ssh/known_hosts")
    verify_host_key: bool = True
    connect_timeout: float = Field(default=10.0, gt=0)
    keepalive: float = Field(default=15.0, gt=0)
    """Seconds between keep-alives: a host that answers none of three is gone."""

    @field_validator("key_file", mode="before")
    @classmethod
    def _one_or_more(cls, value: Any) -> Any:
        return [value] if isinstance(value, str | Path) else value

    @field_validator("key_file", mode="after")
    @classmethod
    def _expand_keys(cls, value: list[Path]) -> list[Path]:
        return [path.expanduser() for path in value]

    @field_validator("password_file", "known_hosts", mode="after")
    @classmethod
    def _expand(cls, value: Path | None) -> Path | None:
        return value.expanduser() if value is not None else None

    @classmethod
    def parse(cls, node_name: str, options: dict[str, Any]) -> SshOptions:
        """The options of node ``node_name``, or :class:`ConfigError` naming the key."""
        where = f"node {node_name!r}"
        for key in options:
            if key in SECRET_OPTIONS:
                raise ConfigError(
                    f"{where}: option {key!r} is not accepted: secrets stay out of the "
                    "config; put the password in a file and give password_file, or use "
                    "key_file or the SSH agent"
                )
        values = dict(options)
        for key in ("port",):  # `--option port=2222` arrives as a string
            if isinstance(values.get(key), str) and values[key].isdigit():
                values[key] = int(values[key])
        for key in ("agent", "verify_host_key"):
            if isinstance(values.get(key), str) and values[key].lower() in _BOOLS:
                values[key] = _BOOLS[values[key].lower()]
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            error = exc.errors()[0]
            key = ".".join(str(part) for part in error["loc"]) or "options"
            if error["type"] == "missing":
                raise ConfigError(
                    f"{where}: option {key!r} is required by the ssh driver"
                ) from None
            if error["type"] == "extra_forbidden":
                raise ConfigError(
                    f"{where}: unknown option {key!r} for the ssh driver "
                    f"(known: {', '.join(cls.model_fields)})"
                ) from None
            raise ConfigError(f"{where}: option {key!r}: {error['msg']}") from None


_BOOLS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}
