"""The pluggy hook specifications of resalign (project name ``resalign``).

Catalog hooks receive a ``register(name, component)`` callback, in the style of simonw/llm and tox 4;
built-in components are registered through exactly the same hooks as third-party packages, which
declare ``[project.entry-points.resalign] my_plugin = "my_package.module"``.

Observer hooks are told about run events; ``resalign_on_outer_step`` may return ``True`` to stop a
run early (the run still saves its model and report).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pluggy

PROJECT = "resalign"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

Register = Callable[[str, Any], None]


@hookspec
def register_harmful_losses(register: Register) -> None:
    """Register harmful losses L_harmful(θ) (Eq. 3): ``register("ga", GradientAscent)``.

    A component is a class following :class:`resalign.components.HarmfulLoss`.
    """


@hookspec
def register_regularizers(register: Register) -> None:
    """Register utility regularizers R(θ) (Eq. 3), classes following ``components.Regularizer``."""


@hookspec
def register_adapters(register: Register) -> None:
    """Register ADAPT methods (full, LoRA, SVDiff, CustomDiffusion...), ``components.Adapter``."""


@hookspec
def register_solvers(register: Register) -> None:
    """Register hypergradient solvers (Alg. 1 and alternatives), ``components.Solver``."""


@hookspec
def register_finetune_losses(register: Register) -> None:
    """Register fine-tuning losses L_FT (denoise, prior preservation), ``components.FinetuneLoss``."""


@hookspec
def register_scorers(register: Register) -> None:
    """Register image scorers (harm detectors, classifiers, Fréchet distance), ``components.Scorer``."""


@hookspec
def register_models(register: Register) -> None:
    """Register model loaders (toy world, diffusers folders), ``components.ModelLoader``."""


@hookspec
def register_methods(register: Register) -> None:
    """Register method recipes that ``resalign compare --methods`` runs by name, each a
    :class:`resalign.components.MethodRecipe` (harmful loss, β, solver, pool, θ, steps and its role in
    Tab. 1): ``register("my-method", MethodRecipe(settings={"loss": "esd", "beta": 0.5}, matched=True))``.
    """


@hookspec
def on_outer_step(step: int, metrics: dict[str, float]) -> bool | None:
    """Called after every outer step of Alg. 2 with its logged figures; return True to stop the run."""


@hookspec
def on_run_end(run_dir: str, report: dict[str, Any]) -> None:
    """Called when a command has written its run directory and report."""
