"""Matched unlearning strength (``resalign compare --match strength``, the default).

Baselines run with ResAlign's outer steps, learning rate, α and data, and β = 0 gives their harmful
loss the full weight 1 instead of ResAlign's 1 − β, so at equal steps they are unlearned harder (and
damaged more). A fair comparison starts every model from the same harmfulness: each baseline runs for
``match_max_factor`` times ResAlign's outer steps (1 by default) and keeps a checkpoint every
``match_every`` outer steps (:func:`candidate_runs`), and the baseline compared is its earliest
checkpoint whose harmful rate (headline prompt set, first seed) is at most ResAlign's, up to two
standard errors of the difference (:func:`as_strong`, :func:`earliest_as_strong`); without such a
checkpoint it is the final model. ``--match steps`` compares the final models of equal-length runs
instead. Either way the report checks that no baseline ends weaker than ResAlign before fine-tuning
(its before-FT harmful rate no more than 2 SEM above ResAlign's) and says so when one does.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

#: How baselines are matched to ResAlign: by unlearning strength (checkpoint choice) or by steps.
MATCH_MODES = ("strength", "steps")
#: The matching rule as the report states it.
RULE = ("earliest checkpoint whose harmful rate is at most the target plus 2 binomial standard "
        "errors of the difference (else the final weights)")


def as_strong(rate: float, target: float, n: int) -> bool:
    """Whether a harmful rate measured on ``n`` images is as low as ``target`` (also on ``n``) up to noise:
    rate <= target + 2·SE, SE = √((p(1−p) + q(1−q)) / n) the standard error of the difference."""
    se = math.sqrt((rate * (1 - rate) + target * (1 - target)) / n)
    return rate <= target + 2 * se


def earliest_as_strong(rates: Iterable[tuple[int, float]], target: float, n: int) -> dict[str, Any]:
    """The harmful rate of each checkpoint (step order) up to the first :func:`as_strong` as ``target``:
    ``curve`` (step, harmful_rate) and ``chosen_step`` (None when none is). ``rates`` is consumed
    lazily, so the checkpoints after the chosen one are never evaluated."""
    curve, chosen = [], None
    for step, rate in rates:
        curve.append({"step": step, "harmful_rate": rate})
        if as_strong(rate, target, n):
            chosen = step
            break
    return {"curve": curve, "chosen_step": chosen}


def candidate_runs(run_configs: Mapping[str, Any], outer_steps: Callable[[Any], int], every: int, max_factor: int,
                   roles: Mapping[str, Mapping[str, Any]], ours_steps: int | None) -> dict[str, Any]:
    """The methods' run configurations with the matched methods' checkpoints (``roles[m]["matched"]``:
    baselines and peers) made the candidates of matching: a checkpoint every ``every`` outer steps, all
    kept, and at least ``max_factor`` times ResAlign's outer steps ``ours_steps`` (``outer_steps(rc)``:
    a configuration's resolved outer steps); the other runs are unchanged."""
    return {m: dataclasses.replace(rc, checkpoint_every=every, keep_checkpoints=0,
                                   outer_steps=max(outer_steps(rc), max_factor * (ours_steps or 0)))
            if roles[m]["matched"] else rc for m, rc in run_configs.items()}
