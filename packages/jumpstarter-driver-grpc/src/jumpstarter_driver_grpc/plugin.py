"""The plugin module named by this package's ``jmp.plugins`` entry point."""
