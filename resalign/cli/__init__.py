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
from resalign.errors import ConfigError, ResAlignError, RunInterrupted

app = typer.Typer(
    name="resalign",
    help="Resilient safety unlearning of text-to-image diffusion models (ResAlign).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    epilog="Common flags of run, eval, score, attack, compare, ablate and toy: --out, --quiet, --set KEY=VALUE "
           "(a setting of the command's configuration; a TOML value), --device, --dtype, --threads. "
           "See COMMAND --help.",
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


def sweep_out(out, command: str, resume: bool):
    """The run directory of a sweep (``attack``, ``compare``, ``ablate``): ``--out``, or a new timestamped
    folder. ``--resume`` and ``torchrun`` (where every rank must name the same folder) need ``--out``."""
    from pathlib import Path

    from resalign.distributed import launched
    from resalign.rundir import default_out

    if out is not None:
        if resume:
            from resalign.cells import check_resumable

            check_resumable(out, command)
        return Path(out)
    if resume:
        raise ConfigError(f"--resume needs --out DIR, the run directory of the {command} to continue")
    if launched():
        raise ConfigError(f"{command} under torchrun needs --out DIR (every rank writes to the same run directory)")
    return default_out(command)


RESUME_HELP = ("Continue the sweep in --out: finished cells (unlearning runs, fine-tuning runs, evaluations) are "
               "read back, the rest computed; the settings must be the recorded ones.")


for _mod in COMMAND_MODULES:
    try:
        importlib.import_module(_mod)
    except ModuleNotFoundError as _exc:  # a command group not present in this build
        if _exc.name != _mod:
            raise


def _is_usage_error(exc: Exception) -> bool:
    """Whether ``exc`` is a click/typer usage error (unknown option, bad value, ...)."""
    import click

    classes: list[type] = [click.exceptions.ClickException]
    try:  # typer >= 0.24 vendors click; its usage errors derive from TyperException
        from typer.exceptions import TyperException

        classes.append(TyperException)
    except ImportError:  # pragma: no cover - older typer
        pass
    return isinstance(exc, tuple(classes)) and hasattr(exc, "show") and hasattr(exc, "exit_code")


def _quiet_library_progress() -> None:
    """The commands draw their own progress; hide the per-file bars of transformers/diffusers/hub."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # read by all three when first imported
    for module, name in (("transformers.utils.logging", "disable_progress_bar"),
                         ("diffusers.utils.logging", "disable_progress_bar")):
        if module in sys.modules:  # already imported: the variable came too late
            getattr(sys.modules[module], name, lambda: None)()


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``resalign`` script."""
    _quiet_library_progress()
    try:
        return _main(argv)
    finally:
        from resalign.distributed import shutdown

        shutdown()  # leave the torchrun job's process group, if a command joined one


def _main(argv: list[str] | None) -> int:
    try:
        app(args=argv, standalone_mode=False)
        if "torch.distributed" in sys.modules:  # a torchrun rank leaves its process group
            from resalign import distributed

            distributed.shutdown()
    except ResAlignError as exc:
        if os.environ.get("RESALIGN_DEBUG"):
            raise
        from rich.markup import escape

        err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        return exc.exit_code
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted[/]")
        return RunInterrupted.exit_code
    except SystemExit as exc:  # typer.Exit / --help
        return int(exc.code or 0)
    except Exception as exc:  # usage errors (click's, or the copy of click that typer vendors)
        if _is_usage_error(exc):
            exc.show()
            return exc.exit_code
        if type(exc).__name__ == "Abort":
            err_console.print("[yellow]aborted[/]")
            return 1
        raise
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
