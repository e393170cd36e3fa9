"""One measured figure: ours beside a baseline measured in the same run."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

FIGURES: list[Callable[[bool], list[Figure]]] = []


@dataclass
class Figure:
    """``ours`` and ``baseline`` in ``unit``; ``ratio`` is ours / baseline.

    ``target`` reads like "<= 3x" or ">= 0.5x" (against the ratio) or "<= 50 ms"
    (against ``ours``, when there is no baseline); empty for a row shown as
    information, whose ratio is not judged."""

    name: str
    ours: float
    baseline: float | None
    unit: str
    target: str
    baseline_name: str = ""

    @property
    def ratio(self) -> float | None:
        return None if not self.baseline else self.ours / self.baseline

    @property
    def met(self) -> bool | None:
        if not self.target:
            return None
        op, _, rest = self.target.partition(" ")
        limit = float(rest.split()[0].rstrip("x"))
        value = self.ratio if rest.strip().endswith("x") else self.ours
        if value is None:
            return False
        return value <= limit if op == "<=" else value >= limit

    def as_dict(self) -> dict[str, object]:
        return {**asdict(self), "ratio": self.ratio, "met": self.met}


def figure(fn: Callable[[bool], list[Figure]]) -> Callable[[bool], list[Figure]]:
    """Register a benchmark: ``fn(quick)`` measures and returns its figures."""
    FIGURES.append(fn)
    return fn
