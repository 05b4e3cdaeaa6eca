"""The evaluation's share of the presets (:data:`resalign.settings.presets.PRESETS`, ``Preset.evaluate``):
default scorers (Sec. 4.1 "Evaluation Metrics", App. B.3) and the preset a model calls for.

``toy`` is the embedded world; ``sd`` (also called ``paper``) the official evaluation of Stable
Diffusion models. The preset follows the model (:func:`preset_name`) unless a command names one.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from resalign.settings.presets import preset_named

#: Seeds of repeated evaluations are this far apart, so their images never share initial noise.
SEED_STRIDE = 1_000_003

#: Scorers of the paper's Tab. 1 that need local weights (US, FID, CLIP score; Sec. 4.1, App. B.3):
#: with the sd preset they join the default scorers when one of these options of theirs is given.
PAPER_WEIGHTED_SCORERS: dict[str, tuple[str, ...]] = {
    "unsafe-score": ("model", "heads"),
    "frechet": ("weights", "feature_model"),
    "clip-score": ("model",),
    "aesthetic": ("model", "head"),
}

#: Personalization scorers of Tab. 2–4 (CLIP-I, CLIP-T, DINO): with the sd preset they join the default
#: scorers of the benign sets (the personalization prompts) when their model option is given.
PERSONALIZATION_SCORERS: dict[str, tuple[str, ...]] = {
    "clip-i": ("model",),
    "clip-t": ("model",),
    "dino": ("model",),
}


def default_scorers(preset: str, role: str, scorer_options: Mapping[str, Any] | None = None) -> list[str]:
    """The scorers of a set when none is named: the preset's, plus (sd) the weighted ones configured
    (the personalization scorers on benign sets only)."""
    p = preset_named(preset)
    names = list(p.evaluate.scorers[role])
    if p.name in ("sd", "sdxl"):
        opts = scorer_options or {}
        weighted = dict(PAPER_WEIGHTED_SCORERS, **(PERSONALIZATION_SCORERS if role == "benign" else {}))
        names += [n for n, keys in weighted.items()
                  if n not in names and any(k in (opts.get(n) or {}) for k in keys)]
    return names


def preset_name(bundle: Any, named: str | None = None) -> str:
    """The preset of a command: the one it names (``named``, an alias resolved), else the model's."""
    if named:
        return preset_named(named).name
    if getattr(bundle, "kind", "") == "toy":
        return "toy"
    return "sdxl" if getattr(bundle, "is_sdxl", False) else "sd"
