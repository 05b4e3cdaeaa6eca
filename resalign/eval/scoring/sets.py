"""The prompt sets of an evaluation: a prompt file's, or the toy world's harmful, implicit and benign sets.

Harmful generation is measured on prompts that tend to elicit the harmful concept (I2P's sexual
prompts for Stable Diffusion; Sec. 4.1, App. B.3), benign generation on benign prompts. Each set names
its role and the scorers run on its images.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from resalign.data.prompts import PromptSet, read_prompts
from resalign.errors import ConfigError
from resalign.eval.scoring.presets import default_scorers
from resalign.settings.presets import PRESETS

#: Roles of prompt sets: "harmful" sets measure the harmful rate, "benign" ones also utility.
ROLES = ("harmful", "benign")


@dataclass
class EvaluationSettings:
    """The evaluation settings ``attack`` and ``compare`` share (None: the preset's value): the harmful
    and benign prompt sets (:func:`harmful_and_benign_sets`), their scorers, and the generation
    settings in the one vocabulary of every command (:func:`resalign.eval.scoring.evaluator.resolve_generation`)."""

    prompts: str | None = None
    benign_prompts: str | None = None
    category: list[str] = field(default_factory=list)
    limit: int | None = None
    scorers: list[str] = field(default_factory=list)
    scorer_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    toy_prompts: int | None = None
    images_per_prompt: int | None = None
    sample_steps: int | None = None
    guidance: float | None = None


@dataclass
class EvalSet:
    """A named prompt set, its role and the scorers run on its images."""

    name: str
    prompts: PromptSet
    scorers: list[str]
    role: str = "harmful"

    def __post_init__(self):
        if self.role not in ROLES:
            raise ConfigError(f"prompt set {self.name!r}: role {self.role!r}, expected one of {', '.join(ROLES)}")


def toy_prompt_sets(n: int = 100, seed: int = 0) -> dict[str, tuple[PromptSet, str]]:
    """The toy world's evaluation sets: explicit harmful, implicit harmful and benign prompts."""
    from resalign.data import toy

    return {
        "harmful": (PromptSet(toy.harmful_prompts(n, seed), source="toy:harmful"), "harmful"),
        "implicit": (PromptSet(toy.implicit_prompts(n, seed), source="toy:implicit"), "harmful"),
        "benign": (PromptSet(toy.preservation_prompts(n, seed + 1), source="toy:preservation"), "benign"),
    }


def build_sets(
    preset: str,
    *,
    prompts_file: str | Path | None = None,
    categories: Sequence[str] | None = None,
    limit: int | None = None,
    scorers: Sequence[str] | None = None,
    role: str = "harmful",
    toy_prompts: int | None = None,
    only: Sequence[str] | None = None,
    scorer_options: Mapping[str, Any] | None = None,
) -> list[EvalSet]:
    """The prompt sets of an evaluation: the file's prompts, or the toy world's sets.

    ``scorers`` (``--scorer``) replaces the default scorers of every set (:func:`default_scorers`,
    which reads ``scorer_options``); ``only`` keeps the named toy sets.
    """
    if prompts_file is not None:
        ps = read_prompts(prompts_file, categories=categories, limit=limit)
        names = list(scorers) if scorers else default_scorers(preset, role, scorer_options)
        return [EvalSet(Path(prompts_file).stem, ps, names, role)]
    if preset != "toy":
        raise ConfigError("--prompts FILE is required for a model outside the toy world (e.g. an I2P CSV)")
    if categories:
        raise ConfigError("--category filters a CSV prompt file's 'categories' column: pass --prompts FILE")
    n = toy_prompts or PRESETS["toy"].evaluate.prompts_per_set
    out = []
    for name, (ps, set_role) in toy_prompt_sets(n).items():
        if only and name not in only:
            continue
        if limit is not None:
            ps = ps.subset(range(min(limit, len(ps))))
        names = list(scorers) if scorers else list(PRESETS["toy"].evaluate.scorers[set_role])
        out.append(EvalSet(name, ps, names, set_role))
    if only:
        unknown = sorted(set(only) - {s.name for s in out})
        if unknown:
            raise ConfigError(f"unknown toy prompt set(s) {', '.join(unknown)}; expected harmful, implicit, benign")
    return out


def harmful_and_benign_sets(
    preset: str,
    *,
    prompts: str | Path | None,
    benign_prompts: str | Path | None,
    categories: Sequence[str] | None,
    limit: int | None,
    scorers: Sequence[str] | None,
    toy_prompts: int | None,
    scorer_options: Mapping[str, Any] | None = None,
) -> tuple[list[EvalSet], list[EvalSet]]:
    """The harmful sets (``--prompts``, or the toy harmful and implicit sets) and the benign ones
    (``--benign-prompts``, or the toy benign set when the toy sets are used) of attack and compare;
    ``scorer_options`` adds the configured weighted scorers to the defaults (:func:`default_scorers`)."""
    harm = build_sets(preset, prompts_file=prompts, categories=categories, limit=limit, scorers=scorers,
                      toy_prompts=toy_prompts, only=None if prompts else ("harmful", "implicit"),
                      scorer_options=scorer_options)
    benign: list[EvalSet] = []
    if benign_prompts:
        benign = build_sets(preset, prompts_file=benign_prompts, limit=limit, role="benign", scorers=scorers,
                            scorer_options=scorer_options)
    elif preset == "toy" and not prompts:
        benign = build_sets("toy", toy_prompts=toy_prompts, only=("benign",), limit=limit, scorers=scorers)
    return harm, benign


def options_for(options: Mapping[str, Mapping[str, Any]], sets: Sequence[EvalSet]) -> dict[str, Any]:
    """The ``--scorer-option`` entries of the scorers that ``sets`` use."""
    names = {n for s in sets for n in s.scorers}
    return {k: dict(v) for k, v in options.items() if k in names}


def check_scorer_options(options: Mapping[str, Any], sets: Sequence[EvalSet]) -> None:
    """An option for a scorer no set uses is a mistake (a typo in the scorer's name): say so."""
    unknown = sorted(set(options) - {n for s in sets for n in s.scorers})
    if unknown:
        used = sorted({n for s in sets for n in s.scorers})
        raise ConfigError(f"--scorer-option for {', '.join(unknown)}: that scorer is not used "
                          f"(scorers in use: {', '.join(used)})")
