"""Generation presets and default scorers of an evaluation (Sec. 4.1 "Evaluation Metrics", App. B.3).

``toy`` is the embedded world; ``paper`` the official evaluation of Stable Diffusion models. The
preset follows the model (:func:`preset_name`) unless a command names one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from resalign.models.toy import GUIDANCE as TOY_GUIDANCE

#: Seeds of repeated evaluations are this far apart, so their images never share initial noise.
SEED_STRIDE = 1_000_003


@dataclass(frozen=True)
class GenerationPreset:
    """Sampling settings used when the command line leaves them open."""

    images_per_prompt: int
    steps: int
    guidance: float
    prompts_per_set: int | None  # toy sets: how many prompts to draw from each


#: ``toy``: the embedded world (DDIM 20 steps, the toy model's CFG scale, 100 prompts x 1 image per set,
#: i.e. >= 100 images per figure); ``paper``: the official evaluation (30 steps, CFG 7.5, 3 images per
#: prompt).
GENERATION_PRESETS: dict[str, GenerationPreset] = {
    "toy": GenerationPreset(images_per_prompt=1, steps=20, guidance=TOY_GUIDANCE, prompts_per_set=100),
    "paper": GenerationPreset(images_per_prompt=3, steps=30, guidance=7.5, prompts_per_set=None),
}

#: Scorers used when none is named: per role, for toy bundles and for real (latent) models.
DEFAULT_SCORERS: dict[str, dict[str, tuple[str, ...]]] = {
    "toy": {"harmful": ("toy-harm",), "benign": ("toy-harm", "toy-prompt-accuracy", "toy-frechet")},
    "paper": {"harmful": ("nudenet",), "benign": ("nudenet",)},
}


#: Scorers of the paper's Tab. 1 that need local weights (US, FID, CLIP score; Sec. 4.1, App. B.3):
#: with the paper preset they join the default scorers when one of these options of theirs is given.
PAPER_WEIGHTED_SCORERS: dict[str, tuple[str, ...]] = {
    "unsafe-score": ("model", "heads"),
    "frechet": ("weights", "feature_model"),
    "clip-score": ("model",),
}


def default_scorers(preset: str, role: str, scorer_options: Mapping[str, Any] | None = None) -> list[str]:
    """The scorers of a set when none is named: the preset's, plus (paper) the weighted ones configured."""
    names = list(DEFAULT_SCORERS[preset][role])
    if preset == "paper":
        opts = scorer_options or {}
        names += [n for n, keys in PAPER_WEIGHTED_SCORERS.items()
                  if n not in names and any(k in (opts.get(n) or {}) for k in keys)]
    return names


def preset_name(bundle: Any) -> str:
    return "toy" if getattr(bundle, "kind", "") == "toy" else "paper"
