"""The hook specifications, at the path plugin authors know; they live in
:mod:`jumpstarter.plugins.hookspecs`."""

from jumpstarter.plugins.hookspecs import *  # noqa: F403
from jumpstarter.plugins.hookspecs import hookimpl, hookspec

__all__ = ["hookimpl", "hookspec"]
