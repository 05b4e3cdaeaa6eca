"""The ``resalign`` command line: argument parsing, progress bars and tables; no algorithm.

One module per command group registers its commands on :data:`app`. Errors derived from
:class:`resalign.errors.ResAlignError` print one line and exit non-zero (``RESALIGN_DEBUG=1`` shows
the traceback).
"""

from __future__ import annotations

import importlib
import os
import sys

import typer
from rich.console import Console

from resalign import __version__
from resalign.errors import ResAlignError, RunInterrupted

app = typer.Typer(
    name="resalign",
    help="Resilient safety unlearning of text-to-image diffusion models (ResAlign).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)

#: Command modules, each adding its commands to ``app``.
COMMAND_MODULES = (
    "resalign.cli.plugins",
    "resalign.cli.toy",
    "resalign.cli.run",
    "resalign.cli.evaluate",
    "resalign.cli.ablate",
)


def _version(value: bool) -> None:
    if value:
        console.print(f"resalign {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version."),
) -> None:
    """Resilient safety unlearning of text-to-image diffusion models (ResAlign)."""


for _mod in COMMAND_MODULES:
    try:
        importlib.import_module(_mod)
    except ModuleNotFoundError as _exc:  # a command group not present in this build
        if _exc.name != _mod:
            raise


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``resalign`` script."""
    try:
        app(args=argv, standalone_mode=False)
    except ResAlignError as exc:
        if os.environ.get("RESALIGN_DEBUG"):
            raise
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        return exc.exit_code
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted[/]")
        return RunInterrupted.exit_code
    except SystemExit as exc:  # typer.Exit / --help
        return int(exc.code or 0)
    except Exception as exc:  # click usage errors carry their own exit code
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            return exc.exit_code
        if isinstance(exc, click.exceptions.Exit):
            return exc.exit_code
        if isinstance(exc, click.exceptions.Abort):
            err_console.print("[yellow]aborted[/]")
            return 1
        raise
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
