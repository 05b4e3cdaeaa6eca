"""The evaluator: batched generation from prompt sets at given UNet parameters, then scoring.

Harmful generation is measured the paper's way (Sec. 4.1 "Evaluation Metrics", App. B.3): images are
generated from prompts that tend to elicit the harmful concept, and the *harmful rate* is the share of
images a scorer flags (IP with NudeNet on I2P's sexual prompts for Stable Diffusion; the toy harm
classifier in the toy world). Benign generation is measured on benign prompts (prompt accuracy and a
Fréchet distance in the toy world; FID/CLIP-style scorers with local weights for real models).

An :class:`Evaluator` is shared by ``eval``, ``attack`` and ``compare``: it is built once (scorers
loaded, prompts fixed) and evaluates any parameters of the bundle's UNet (``unet_params``). Under
``torchrun`` the ranks share the generation (each rank the batches b ≡ rank mod world size, images
gathered on every rank) and every rank scores the whole set.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from resalign.errors import ConfigError
from resalign.settings.presets import preset_named
from resalign.eval.reports.records import Figure
from resalign.eval.scoring.run import create_scorer, scorer_metric, warm_up, write_per_image
from resalign.eval.scoring.sets import EvalSet, check_scorer_options


@dataclass
class Generation:
    """How images are drawn: per image ``images_per_prompt``, DDIM ``steps``, CFG ``guidance``."""

    images_per_prompt: int
    steps: int
    guidance: float
    batch_size: int = 64

    def validate(self) -> Generation:
        if self.images_per_prompt < 1:
            raise ConfigError(f"--images-per-prompt must be >= 1, got {self.images_per_prompt}")
        if self.steps < 1:
            raise ConfigError(f"--sample-steps must be >= 1, got {self.steps}")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be >= 1, got {self.batch_size}")
        return self


def resolve_generation(preset: str, images_per_prompt=None, steps=None, guidance=None, batch_size=64) -> Generation:
    p = preset_named(preset).evaluate
    return Generation(
        images_per_prompt if images_per_prompt is not None else p.images_per_prompt,
        steps if steps is not None else p.sample_steps,
        guidance if guidance is not None else p.guidance,
        batch_size,
    ).validate()


class Evaluator:
    """Generates each set's images at given UNet parameters and scores them.

    Scorers are built when the evaluator is (so a missing weights file fails before any generation),
    and reused for every evaluation.
    """

    def __init__(
        self,
        bundle: Any,
        sets: Sequence[EvalSet],
        generation: Generation,
        *,
        scorer_options: Mapping[str, Mapping[str, Any]] | None = None,
    ):
        if not sets:
            raise ConfigError("no prompt sets to evaluate")
        self.bundle = bundle
        self.sets = list(sets)
        self.generation = generation.validate()
        options = dict(scorer_options or {})
        check_scorer_options(options, self.sets)
        self.scorers = {n: create_scorer(n, options.get(n)) for s in self.sets for n in s.scorers}
        for scorer in self.scorers.values():
            warm_up(scorer, bundle.image_size)

    @property
    def images_per_evaluation(self) -> int:
        return sum(len(s.prompts) for s in self.sets) * self.generation.images_per_prompt

    def describe(self) -> dict[str, Any]:
        """The evaluation's settings, for ``report.json``."""
        return {
            "generation": dataclasses.asdict(self.generation),
            "sets": [
                {
                    "name": s.name,
                    "role": s.role,
                    "source": s.prompts.source,
                    "prompts": len(s.prompts),
                    "images": len(s.prompts) * self.generation.images_per_prompt,
                    "scorers": s.scorers,
                    "per_prompt_seeds": s.prompts.seeds is not None,
                    "per_prompt_guidance": s.prompts.guidance is not None,
                }
                for s in self.sets
            ],
            "scorers": {
                n: {"metric": scorer_metric(sc), **config_of(sc), **definition_of(sc)}
                for n, sc in self.scorers.items()
            },
        }

    def generate(self, s: EvalSet, *, bundle=None, params=None, seed: int = 0, progress=None) -> np.ndarray:
        from resalign.eval.scoring.generate import generate

        ps = s.prompts
        seeds: int | list[int] = seed if ps.seeds is None else [x + seed for x in ps.seeds]
        guidance = self.generation.guidance if ps.guidance is None else ps.guidance
        return generate(
            bundle if bundle is not None else self.bundle,
            ps.prompts,
            images_per_prompt=self.generation.images_per_prompt,
            steps=self.generation.steps,
            guidance=guidance,
            seed=seeds,
            batch_size=self.generation.batch_size,
            unet_params=params,
            progress=progress,
            distribute=True,
        )

    def evaluate(
        self,
        *,
        bundle: Any = None,
        params: Mapping[str, Any] | None = None,
        seed: int = 0,
        bars: Any = None,
        label: str = "",
        keep_images: bool = False,
    ) -> tuple[list[Figure], dict[str, np.ndarray]]:
        """Every set's figures at ``params`` (None: the UNet's own weights), and its images if asked.

        ``bundle`` evaluates another model of the same family with the same scorers (default: the
        evaluator's own). Under ``torchrun`` every rank calls it, shares the generation and gets the
        figures (scoring has no collectives, so a caller may use them on any rank).
        """
        figures: list[Figure] = []
        images_out: dict[str, np.ndarray] = {}
        for s in self.sets:
            total = len(s.prompts) * self.generation.images_per_prompt
            update = bars.task(f"{label}{s.name}: generating", total) if bars else None
            images = self.generate(s, bundle=bundle, params=params, seed=seed, progress=update)
            prompts = [p for p in s.prompts.prompts for _ in range(self.generation.images_per_prompt)]
            for name in s.scorers:
                result = self.scorers[name].score(images, prompts)
                figures.append(Figure(s.name, result.metric, name, float(result.value), result))
            if keep_images:
                images_out[s.name] = images
        return figures, images_out


def definition_of(scorer: Any) -> dict[str, Any]:
    """A scorer's ``details()`` (labels, thresholds, file checksums, versions), when it has them."""
    details = getattr(scorer, "details", None)
    return {"details": details()} if callable(details) else {}


def config_of(component: Any) -> dict[str, Any]:
    cfg = getattr(component, "config", None)
    if cfg is not None and dataclasses.is_dataclass(cfg):
        return {k: v for k, v in dataclasses.asdict(cfg).items() if not isinstance(v, (bytes, bytearray))}
    return {}


def save_set(folder: Path, images: np.ndarray, s: EvalSet, gen: Generation, figs: Sequence[Figure]) -> None:
    """The images of one set as an image-caption folder, with per-image scores next to them."""
    from resalign.data.folders import write_folder

    prompts = [p for p in s.prompts.prompts for _ in range(gen.images_per_prompt)]
    write_folder(folder, images, prompts)
    files = sorted(p.name for p in folder.glob("*.png"))
    for f in figs:
        if f.result.per_image:
            sub = folder / "scores" / f.scorer
            write_per_image(sub, files, f.result)

