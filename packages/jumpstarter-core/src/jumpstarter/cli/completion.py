"""``jmp completion``: shell completion scripts, from click's own completion support."""

from __future__ import annotations

import click

SHELLS = ["bash", "zsh", "fish"]


@click.command()
@click.argument("shell", type=click.Choice(SHELLS))
@click.pass_context
def completion(ctx: click.Context, shell: str) -> None:
    """Print the completion script for SHELL (bash, zsh or fish).

    \b
    Install it:
      eval "$(jmp completion bash)"        in ~/.bashrc
      eval "$(jmp completion zsh)"         in ~/.zshrc
      jmp completion fish > ~/.config/fish/completions/jmp.fish
    """
    from click.shell_completion import get_completion_class

    from . import cli

    shell_class = get_completion_class(shell)
    assert shell_class is not None  # the choice allows only shells click knows
    script = shell_class(cli, {}, "jmp", "_JMP_COMPLETE").source()
    click.echo(script, nl=not script.endswith("\n"))
