"""Option types of ``jmp`` commands: durations, points in time, metrics. A bad value is
a usage error (exit 2) whose message names the value and shows what would do."""

from __future__ import annotations

import math
import re
from datetime import datetime, timedelta
from typing import Any

import click

TASK_STATES = ["pending", "running", "succeeded", "failed", "stopped", "timed_out", "lost"]
OUTCOMES = ["passed", "failed", "skipped", "error", "xfail", "xpass"]


class Seconds(click.ParamType):
    """A finite number of seconds, at least ``min`` (above it if ``min_open``)."""

    name = "seconds"

    def __init__(self, min: float = 0.0, *, min_open: bool = False, max: float | None = None) -> None:
        self.min, self.min_open, self.max = min, min_open, max

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        if isinstance(value, float):
            return value
        try:
            seconds = float(value)
        except ValueError:
            self.fail(f"{value!r} is not a number of seconds", param, ctx)
        too_low = seconds <= self.min if self.min_open else seconds < self.min
        if not math.isfinite(seconds) or too_low or (self.max is not None and seconds > self.max):
            bound = f"above {self.min:g}" if self.min_open else f"at least {self.min:g}"
            if self.max is not None:
                bound += f" and at most {self.max:g}"
            self.fail(f"{value!r} is not a number of seconds {bound}", param, ctx)
        return seconds


_AGE = re.compile(r"^(\d+(?:\.\d+)?)(s|m|h|d|w)$")
_AGE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


class When(click.ParamType):
    """A point in time: ISO 8601 (``2024-05-01``, ``2024-05-01T14:30``,
    ``2024-05-01T14:30:00+02:00``; without an offset it is local time) or an age
    (``45s``, ``30m``, ``2h``, ``3d``, ``1w``: that long ago)."""

    name = "when"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> datetime:
        if isinstance(value, datetime):
            return value
        try:
            return parse_when(value)
        except OverflowError:
            self.fail(f"{value!r} is too far in the past or future for a date", param, ctx)
        except ValueError:
            self.fail(
                f"{value!r} is neither a date nor an age; use ISO 8601 "
                "(2024-05-01, 2024-05-01T14:30, 2024-05-01T14:30:00Z) or an age (45s, 30m, 2h, 3d, 1w)",
                param,
                ctx,
            )


def parse_when(value: str, now: datetime | None = None) -> datetime:
    """``value`` as an aware datetime; ValueError if it is neither ISO 8601 nor an age,
    OverflowError if it is beyond the dates Python holds."""
    age = _AGE.match(value.strip().lower())
    if age:
        now = now or datetime.now().astimezone()
        return now - timedelta(seconds=float(age[1]) * _AGE_UNITS[age[2]])
    when = datetime.fromisoformat(value.strip())
    return when if when.tzinfo is not None else when.astimezone()


_METRIC = re.compile(
    r"^(?P<name>[^=\s]+)=(?P<value>[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?)(?P<unit>[^\d\s.+-]\S*)?$"
)


def parse_metrics(values: tuple[str, ...], option: str = "--metric") -> dict[str, dict[str, Any]]:
    """``NAME=VALUE[UNIT]`` options (``boot=812ms``, ``temp=41.5C``, ``ratio=0.93``) to
    ``{name: {"value": …, "unit": …}}``; a usage error names the bad one."""
    metrics: dict[str, dict[str, Any]] = {}
    for text in values:
        match = _METRIC.match(text)
        if match is None or not math.isfinite(float(match["value"])):
            raise click.BadParameter(
                f"{text!r} is not NAME=VALUE[UNIT] (like boot=812ms, temp=41.5C or ratio=0.93)",
                param_hint=option,
            )
        if match["name"] in metrics:
            raise click.BadParameter(f"metric {match['name']!r} is given twice", param_hint=option)
        metric: dict[str, Any] = {"value": float(match["value"])}
        if match["unit"]:
            metric["unit"] = match["unit"]
        metrics[match["name"]] = metric
    return metrics
