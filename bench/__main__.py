"""Run the benchmarks: ``uv run python -m bench [--quick] [--json FILE] [--only TEXT]``.

Every public module of this package (``bench/*.py`` not starting with ``_``) is
imported; each registers its figure functions with :func:`bench._figure.figure`. Each
function measures its figures beside their baselines in the same run and returns them;
this runner prints one table (and writes the same as JSON with ``--json``).

Exit code: 0 when every figure was measured (met or not), 1 when one failed to run.
"""

from __future__ import annotations

import argparse
import json
import os
import pkgutil
import platform
import sys
import time
import traceback
from collections.abc import Callable
from importlib import import_module
from pathlib import Path

from ._figure import FIGURES, Figure

HERE = Path(__file__).resolve().parent


def load_modules() -> None:
    """Import every public module of ``bench`` so its figures register themselves."""
    for module in pkgutil.iter_modules([str(HERE)]):
        if not module.name.startswith("_"):
            import_module(f"{__package__ or 'bench'}.{module.name}")


def describe(fn: Callable[..., object]) -> str:
    """What ``--only`` matches against: ``module.function`` and the docstring."""
    module = fn.__module__.rpartition(".")[2]
    return f"{module}.{fn.__name__} {fn.__doc__ or ''}".lower()


def _number(value: float | None) -> str:
    if value is None:
        return "-"
    if value == 0 or 0.01 <= abs(value) < 100_000:
        return f"{value:.3g}" if abs(value) < 100 else f"{value:,.0f}"
    return f"{value:.3g}"


def table(figures: list[Figure]) -> str:
    """The figures as a plain text table, one row each."""
    header = ("figure", "ours", "baseline", "ratio", "target", "met")
    rows = [header]
    for f in figures:
        rows.append(
            (
                f.name,
                f"{_number(f.ours)} {f.unit}",
                f"{_number(f.baseline)} {f.unit}" if f.baseline is not None else "-",
                f"{f.ratio:.2f}x" if f.ratio is not None else "-",
                f.target or "(info)",
                "-" if f.met is None else "yes" if f.met else "NO",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = []
    for n, row in enumerate(rows):
        cells = [
            cell.ljust(w) if i == 0 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Measure Jumpstarter's hot paths beside baselines measured in the same run.",
    )
    parser.add_argument(
        "--quick", action="store_true", help="fewer repetitions: all figures in under a minute"
    )
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON to FILE")
    parser.add_argument(
        "--only",
        metavar="TEXT",
        action="append",
        help="run only the figure functions whose module.name or docstring contains TEXT "
        "(repeat it for several)",
    )
    parser.add_argument(
        "--list", action="store_true", help="list the figure functions (module.name) and run none"
    )
    args = parser.parse_args(argv)

    load_modules()
    selected = [fn for fn in FIGURES if args.only is None or any(t.lower() in describe(fn) for t in args.only)]
    if not selected:
        parser.error(f"no figure matches {' or '.join(map(repr, args.only))}")
    if args.list:
        for fn in selected:
            print(f"{fn.__module__.rpartition('.')[2]}.{fn.__name__}")
        return 0

    figures: list[Figure] = []
    errors: list[dict[str, str]] = []
    started = time.perf_counter()
    for fn in selected:
        name = f"{fn.__module__.rpartition('.')[2]}.{fn.__name__}"
        print(f"bench: {name} ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        try:
            measured = fn(args.quick)
        except Exception as exc:  # one broken figure must not hide the others
            traceback.print_exc()
            errors.append({"function": name, "error": f"{type(exc).__name__}: {exc}"})
            continue
        print(f"bench: {name} took {time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)
        figures.extend(measured)
    elapsed = time.perf_counter() - started

    print(table(figures))
    for error in errors:
        print(f"FAILED {error['function']}: {error['error']}")
    mode = ", quick" if args.quick else ""
    print(f"({elapsed:.1f}s{mode}, {os.cpu_count()} CPUs, Python {platform.python_version()})")
    if args.json:
        report = {
            "quick": args.quick,
            "seconds": elapsed,
            "machine": {
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "platform": platform.platform(),
            },
            "figures": [f.as_dict() for f in figures],
            "errors": errors,
        }
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
