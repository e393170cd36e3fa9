"""JUnit XML both ways, at the path users know; it lives in
:mod:`jumpstarter.results.junit`."""

from jumpstarter.results.junit import export_junit, parse_junit

__all__ = ["export_junit", "parse_junit"]
