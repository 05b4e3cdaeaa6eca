"""Progress bars of the long commands (``eval``, ``attack``, ``compare``, ``ablate``)."""

from __future__ import annotations

from collections.abc import Callable


class Bars:
    """Rich progress bars for long work (a no-op when disabled, e.g. in tests or ``--quiet``)."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self._progress = None

    def __enter__(self) -> Bars:
        if self.enabled:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._progress = Progress(
                TextColumn("[progress.description]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
            )
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
