"""Progress displays: the bars of the long commands (``eval``, ``attack``, ``compare``, ``ablate``) and
the display of ``resalign run`` (data generation, then the outer steps of Alg. 2 with their loss terms,
‖h‖ and ETA, and at the end the health of the simulated fine-tunings)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def _rich_progress(*description: Any, tail: tuple[Any, ...] = ()):
    """A rich ``Progress``: the description columns, bar, done/total, elapsed time, then ``tail``."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    return Progress(*description, BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), *tail)


class Bars:
    """Rich progress bars for long work (a no-op when disabled, e.g. in tests or ``--quiet``)."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self._progress = None

    def __enter__(self) -> Bars:
        if self.enabled:
            from rich.progress import TextColumn, TimeRemainingColumn

            self._progress = _rich_progress(TextColumn("[progress.description]{task.description}"),
                                            tail=(TimeRemainingColumn(),))
            self._progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)
            self._progress = None

    def task(self, description: str, total: int, *, keep: bool = False) -> Callable[..., None]:
        """A callback ``update(done, total=None, description=None)`` for a new bar.

        The bar disappears once complete unless ``keep`` (the outer loops keep theirs).
        """
        if self._progress is None:
            return lambda *a, **k: None
        prog = self._progress
        tid = prog.add_task(description, total=total)
        state = {"total": total, "open": True}

        def update(done: int, total: int | None = None, description: str | None = None) -> None:
            if not state["open"]:
                return
            state["total"] = total if total is not None else state["total"]
            prog.update(tid, completed=done, total=state["total"], **({"description": description} if description else {}))
            if not keep and done >= state["total"]:
                prog.remove_task(tid)
                state["open"] = False

        return update

    def log(self, message: str) -> None:
        if self._progress is not None:
            self._progress.console.print(message, highlight=False)


class RunProgress:
    """A rich progress display: data generation, then outer steps with loss terms, ‖h‖ and ETA."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.tasks: dict[str, Any] = {}
        self.progress = None
        if enabled:
            from rich.progress import TextColumn, TimeRemainingColumn

            self.progress = _rich_progress(TextColumn("[bold]{task.description:<18}"), tail=(
                TextColumn("ETA"), TimeRemainingColumn(), TextColumn("{task.fields[info]}")))

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
