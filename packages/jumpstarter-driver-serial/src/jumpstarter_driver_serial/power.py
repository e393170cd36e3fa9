"""Power back ends: a command per action, or a URL per action.

Config (the node's ``power`` table; ``pause`` is the off time of a cycle)::

    power = { driver = "command", on = ["uhubctl", "-a", "on", "-p", "2"],
              off = ["uhubctl", "-a", "off", "-p", "2"], pause = 2 }
    power = { driver = "http", on = "http://pdu/outlet/3/on", off = "http://pdu/outlet/3/off",
              status = "http://pdu/outlet/3" }

``cycle`` (a command or URL) is optional: without it a cycle is off, pause, on.
``status`` is optional: a command or URL whose output says ``on`` or ``off``; without
it the state is the last action done (``unknown`` before any).
"""

from __future__ import annotations

import re
import subprocess
from typing import Any

import anyio
from jumpstarter.errors import ConfigError, PowerFailed
from jumpstarter.plugins import PowerDriver

_STATE = re.compile(rb"\b(on|off)\b", re.IGNORECASE)


def _state_in(text: bytes) -> Any:
    match = _STATE.search(text)
    return match.group(1).decode().lower() if match else "unknown"


class _ActionPower(PowerDriver):
    """What both back ends share: one target per action, the last state done."""

    kind = ""

    def __init__(self, options: dict[str, Any]) -> None:
        super().__init__(options)
        self.timeout = float(self.options.pop("timeout", 30))
        self.targets: dict[str, Any] = {}
        for action in ("on", "off", "cycle", "status"):
            if action in self.options:
                self.targets[action] = self._check(action, self.options.pop(action))
        for action in ("on", "off"):
            if action not in self.targets:
                raise ConfigError(f"power.{action}: the {self.kind} power driver needs one")
        self._extra(self.options)
        self.last: Any = "unknown"

    def _check(self, action: str, value: Any) -> Any:
        raise NotImplementedError

    def _extra(self, options: dict[str, Any]) -> None:
        if options:
            raise ConfigError(f"power.{sorted(options)[0]}: unknown key for the {self.kind} power driver")

    async def _do(self, action: str) -> bytes:
        raise NotImplementedError

    async def on(self) -> None:
        await self._do("on")
        self.last = "on"

    async def off(self) -> None:
        await self._do("off")
        self.last = "off"

    async def cycle(self) -> None:
        if "cycle" not in self.targets:
            await super().cycle()
            return
        await self._do("cycle")
        self.last = "on"

    async def status(self) -> Any:
        if "status" not in self.targets:
            return self.last
        return _state_in(await self._do("status"))


class CommandPower(_ActionPower):
    """Runs a command (an argv list) per action: uhubctl, usbrelay, ipmitool…"""

    kind = "command"

    def _check(self, action: str, value: Any) -> Any:
        if not (isinstance(value, list) and value and all(isinstance(part, str) for part in value)):
            raise ConfigError(f"power.{action}: expected a command as a list of strings, got {value!r}")
        return value

    async def _do(self, action: str) -> bytes:
        argv = self.targets[action]
        try:
            with anyio.fail_after(self.timeout):
                done = await anyio.run_process(argv, check=False, stdin=subprocess.DEVNULL)
        except FileNotFoundError:
            raise PowerFailed(f"power {action}: command not found: {argv[0]}") from None
        except PermissionError:
            raise PowerFailed(f"power {action}: permission denied: {argv[0]}") from None
        except TimeoutError:
            raise PowerFailed(f"power {action}: {argv[0]} took over {self.timeout:g}s") from None
        if done.returncode != 0:
            why = done.stderr.decode(errors="replace").strip().splitlines()
            tail = f": {why[-1]}" if why else ""
            raise PowerFailed(f"power {action}: {argv[0]} exited with {done.returncode}{tail}")
        return done.stdout


class HttpPower(_ActionPower):
    """Sends a request to a URL per action (smart PDUs and sockets). Options:
    ``method`` (default POST; status is always GET), ``headers``."""

    kind = "http"

    def _check(self, action: str, value: Any) -> Any:
        if not (isinstance(value, str) and value.startswith(("http://", "https://"))):
            raise ConfigError(f"power.{action}: expected an http:// or https:// URL, got {value!r}")
        return value

    def _extra(self, options: dict[str, Any]) -> None:
        self.method = str(options.pop("method", "POST")).upper()
        self.headers = dict(options.pop("headers", {}))
        super()._extra(options)

    async def _do(self, action: str) -> bytes:
        import httpx

        url = self.targets[action]
        method = "GET" if action == "status" else self.method
        try:
            async with httpx.AsyncClient(timeout=self.timeout) as client:
                reply = await client.request(method, url, headers=self.headers)
        except httpx.HTTPError as exc:
            raise PowerFailed(f"power {action}: {method} {url}: {exc or type(exc).__name__}") from None
        if reply.status_code >= 400:
            raise PowerFailed(f"power {action}: {method} {url} answered {reply.status_code} {reply.reason_phrase}")
        return reply.content
