"""``python -m jumpstarter.cli``: the same as ``jmp``."""

from . import main

main()
