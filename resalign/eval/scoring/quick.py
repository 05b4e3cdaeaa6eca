"""The short evaluation that ends ``resalign run``: the base model against the unlearned one.

A few prompts per role (``quick_eval`` of the run), one image each, DDIM with few steps and one seed:
the toy world's harmful and benign sets with the toy harm and prompt-accuracy scorers, or for another
model a slice of the run's own D_harmful and D_preserve prompts with the paper preset's default
scorers (skipped, with the reason, when none of them can run from local files). Its figures are rows of the run's
``report.json`` (stage ``quick_eval``, models ``base`` and ``unlearned``; :mod:`resalign.eval.reports.run`);
``resalign eval`` and ``resalign attack`` give the full measurements.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from resalign import distributed
from resalign.data.prompts import PromptSet
from resalign.errors import ResAlignError
from resalign.eval.reports.run import QuickEval
from resalign.eval.scoring.evaluator import Evaluator, resolve_generation
from resalign.eval.scoring.presets import default_scorers, preset_name
from resalign.eval.scoring.sets import EvalSet, harmful_and_benign_sets
from resalign.models.load import load_model

#: DDIM steps of the quick evaluation's images.
QUICK_STEPS = 10
#: The toy world's sets it draws from (the implicit harmful set is ``resalign eval``'s).
TOY_SETS = ("harmful", "benign")
#: Scorers left out: a Fréchet distance needs far more images than a quick evaluation draws.
LEFT_OUT = ("toy-frechet", "frechet")


def quick_sets(cfg: Any, preset: str, image_size: int) -> list[EvalSet]:
    """``cfg.quick_eval`` prompts per role: the toy world's sets, or the run's harmful and preserve prompts."""
    n = cfg.quick_eval
    if preset == "toy":
        harm, benign = harmful_and_benign_sets("toy", prompts=None, benign_prompts=None, categories=None,
                                               limit=None, scorers=None, toy_prompts=n)
        return [dataclasses.replace(s, scorers=[x for x in s.scorers if x not in LEFT_OUT])
                for s in harm + benign if s.name in TOY_SETS]
    from resalign.data.training import read_source

    sets = []
    for name, role in (("harmful", "harmful"), ("preserve", "benign")):
        prompts: list[str] = []
        for src in getattr(cfg.data, name):
            prompts += read_source(src, cfg.data.concept, image_size).prompts
        scorers = [s for s in default_scorers(preset, role) if s not in LEFT_OUT]
        sets.append(EvalSet(name, PromptSet(prompts[:n], source=f"data.{name}"), scorers, role))
    return sets


def quick_eval(cfg: Any, model_dir: Path, device: str) -> QuickEval:
    """Evaluate the run's base model (``cfg.model``) and the unlearned one in ``model_dir``, both as
    loaded from their folders, with the same sets, scorers, generation settings and seed.

    It runs on the calling rank alone (the generation is not split over a ``torchrun`` job).
    """
    with distributed.solo():
        base = load_model(cfg.model, device=device)
        preset = preset_name(base.bundle)
        gen = resolve_generation(preset, images_per_prompt=1, steps=QUICK_STEPS)
        try:
            evaluator = Evaluator(base.bundle, quick_sets(cfg, preset, base.bundle.image_size), gen)
        except ResAlignError as exc:
            return QuickEval(settings={"skipped": str(exc)})
        unlearned = load_model(model_dir, device=device)
        figures = {"base": evaluator.evaluate(seed=cfg.seed)[0],
                   "unlearned": evaluator.evaluate(bundle=unlearned.bundle, seed=cfg.seed)[0]}
    return QuickEval(figures, {"seed": cfg.seed, **evaluator.describe()})
