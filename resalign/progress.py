"""The progress display of ``resalign run``: data generation, then the outer steps of Alg. 2 with their
loss terms, ‖h‖ and ETA, and at the end the health of the simulated fine-tunings."""

from __future__ import annotations

from typing import Any


class RunProgress:
    """A rich progress display: data generation, then outer steps with loss terms, ‖h‖ and ETA."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.tasks: dict[str, Any] = {}
        self.progress = None
        if enabled:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self.progress = Progress(
                TextColumn("[bold]{task.description:<18}"), BarColumn(), MofNCompleteColumn(),
                TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
            )

    def __enter__(self):
        if self.progress is not None:
            self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        if self.progress is not None:
            self.progress.__exit__(*exc)

    def update(self, name: str, completed: int, total: int, info: str = "") -> None:
        if self.progress is None:
            return
        if name not in self.tasks:
            self.tasks[name] = self.progress.add_task(name, total=total, info=info)
        self.progress.update(self.tasks[name], completed=completed, total=total, info=info)

    def log(self, text: str) -> None:
        if self.progress is not None:
            self.progress.console.print(text, highlight=False)


def step_info(m: dict[str, Any]) -> str:
    """One outer step's figures for the progress line: the loss terms of Eq. 4, ‖h‖ and ‖G‖."""
    parts = [f"L_harm {m['loss_harm']:+.4f}", f"R {m['loss_reg']:.4f}"]
    if "harm_ft_mean" in m:
        parts.append(f"L_harm(θ_FT) {m['harm_ft_mean']:+.4f}")
        parts.append(f"‖h‖ {m['hypergrad_norm']:.3g}")
    parts.append(f"‖G‖ {m['grad_norm']:.3g}")
    return "  ".join(parts)


def say_health(health: dict[str, Any]) -> None:
    """The simulations' health (:func:`resalign.core.health.simulation_summary`) on stderr."""
    from rich.console import Console

    console = Console(stderr=True)
    mol = health["median_omega_lambda"]
    console.print(f"simulations: {health['kept']} of {health['simulations']} kept, {health['dropped']} dropped; "
                  f"{health['halved']} solves halved ω, {health['fallback']} fell back, {health['first_order']} in "
                  f"effect first-order" + (f"; median ω·λ_max {mol:.3g}" if mol is not None else ""), highlight=False)
    for w in health["warnings"]:
        console.print(f"[bold yellow]warning:[/] {w}", highlight=False)
