"""``resalign plugins``: every registered component with the distribution that provides it."""

from __future__ import annotations

import json

import typer
from rich.table import Table

from resalign.cli import app, console
from resalign.components import KINDS
from resalign.errors import ConfigError


@app.command("plugins")
def plugins_cmd(
    kind: str = typer.Option(None, "--kind", help=f"Only this kind: {', '.join(KINDS)}."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """List registered losses, regularizers, adapters, solvers, fine-tune losses, scorers, models and method recipes."""
    from resalign.registry import get_registry

    if kind is not None and kind not in KINDS:
        raise ConfigError(f"--kind {kind!r}: expected one of {', '.join(KINDS)}")
    reg = get_registry()
    rows = [
        {
            "kind": i.kind,
            "name": i.name,
            "distribution": i.distribution,
            "version": i.version,
            "plugin": i.plugin,
            "module": i.module,
        }
        for i in reg.infos(kind)
    ]
    errors = [{"plugin": e.entry_point, "distribution": e.distribution, "error": e.error} for e in reg.load_errors]
    if as_json:
        console.print_json(json.dumps({"components": rows, "errors": errors}))
        return
    table = Table(title="resalign components")
    for col in ("kind", "name", "distribution", "version", "module"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["kind"], r["name"], r["distribution"], r["version"], r["module"])
    console.print(table)
    for e in errors:
        console.print(f"[yellow]plugin {e['plugin']!r} ({e['distribution']}) failed to load and was skipped:[/] {e['error']}")
