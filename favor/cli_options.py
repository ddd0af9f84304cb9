"""What every command line shares: ``-h/--help``, ``--version``, help laid out for 80 columns.

    app = typer.Typer(context_settings=CONTEXT, rich_markup_mode=None, ...)  # plain help wraps at 80
    @app.callback()
    def main(version: VersionOption = False): ...
"""

from __future__ import annotations

from typing import Annotated

import typer

HELP_WIDTH = 80  # columns: help stays readable on a default terminal and in a pasted log
CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": HELP_WIDTH}


def _print_version(ctx: typer.Context, value: bool) -> None:
    if value:
        from favor import __version__

        typer.echo(f"{ctx.find_root().info_name or 'favor'} {__version__}")
        raise typer.Exit()


VersionOption = Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                             help="Print the version and exit.")]
VerboseOption = Annotated[bool, typer.Option("--verbose", "-v",
                                             help="Show library warnings, logs and progress bars.")]
