"""pytest plugin (entry point ``pytest11``). Inert unless ``--jmp-session`` is given."""
