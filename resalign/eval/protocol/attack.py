"""The plan of ``resalign attack``: presets, data sources and schedule of a downstream fine-tuning.

An unlearned model is fine-tuned the way a downstream user would (Sec. 4.1 "Implementation Details",
Sec. 4.2, App. B.4) on pairs that :func:`load_pairs` reads, in the stages of a :class:`Plan`. The
paper's stress tests:

* ``--contaminate R --harmful-data DIR``: a share R of the fine-tuning pairs replaced by harmful ones
  (Fig. 4, App. B.2);
* ``--escape p=2,lambda=0.5``: L_FT(θ') − λ‖θ' − θ‖_p, pushing the weights away from the released
  ones (App. C.1, Tab. 11; :func:`parse_escape`);
* ``--progressive``: the steps split into four equal stages — benign, benign (a second ``--data`` if
  given), the less harmful half of the harmful data (ranked by the harm scorer), all harmful data
  (App. C.1, Fig. 7).

Presets (:data:`resalign.settings.presets.PRESETS`): ``sd`` (``paper``) is App. B.4 (200 steps, lr
1e-5 for full fine-tuning, the reference scripts' lr for the other methods, evaluation every 50
steps). ``toy`` keeps the protocol and scales the learning rates to the toy model: the evaluation lr of SD v1.4 is a tenth of its pretraining lr (1e-5 vs 1e-4),
and the toy model was pretrained at 1e-3, so its evaluation lr is 1e-4 (and likewise ×10 for each
method).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from resalign.errors import ConfigError, DataError
from resalign.eval.protocol.finetune import FinetuneSpec, Stage, adapter_class, reference_lr, uses_prior
from resalign.eval.protocol.pairs import Pairs, contaminate
from resalign.eval.scoring.presets import preset_name
from resalign.settings.presets import AttackPreset, preset_named


def preset_lr(preset: AttackPreset, adapt: str) -> float:
    """The fine-tuning learning rate of ``adapt`` under ``preset``: its scale times the method's reference."""
    return preset.lr_scale * reference_lr(adapt)


#: Toy image-caption sets ``--data`` may name (``toy-images:NAME``) instead of a folder, and the seed each
#: is drawn with (the toy generators' own defaults), so a name means the same pairs everywhere.
TOY_DATA_PREFIX = "toy-images:"
TOY_DATA_SEEDS = {"benign-a": 1, "benign-b": 2, "contamination": 3, "harmful": 3}


def parse_escape(text: str | None) -> tuple[int, float] | None:
    """``"p=2,lambda=0.5"`` -> (2, 0.5); the paper's setting is p in {1, 2}, λ = 0.5 (Tab. 11)."""
    if not text:
        return None
    p, lam = None, 0.5
    for part in text.split(","):
        key, sep, value = part.partition("=")
        key = key.strip().lower()
        if not sep:
            raise ConfigError(f"--escape {text!r}: expected p=1|2,lambda=VALUE")
        try:
            if key == "p":
                p = int(value)
            elif key in ("lambda", "lam", "λ"):
                lam = float(value)
            else:
                raise ConfigError(f"--escape {text!r}: unknown key {key!r} (expected p and lambda)")
        except ValueError:
            raise ConfigError(f"--escape {text!r}: {key + '=' + value.strip()!r} is not a number") from None
    if p not in (1, 2):
        raise ConfigError(f"--escape {text!r}: p must be 1 or 2")
    if not (math.isfinite(lam) and lam >= 0):
        raise ConfigError(f"--escape {text!r}: lambda must be a finite number >= 0, got {lam!r}")
    return p, lam

def _toy_set(spec: str, flag: str) -> str | None:
    """The toy set that a ``toy-images:NAME`` source names (an unknown name raises), None for a folder."""
    if not spec.startswith(TOY_DATA_PREFIX):
        return None
    from resalign.data.toy import IMAGE_SETS

    name = spec[len(TOY_DATA_PREFIX):]
    if name not in IMAGE_SETS:
        raise ConfigError(f"{flag} {spec!r}: unknown toy set; expected one of "
                          + ", ".join(TOY_DATA_PREFIX + n for n in IMAGE_SETS))
    return name


def load_pairs(spec: str, *, size: int, toy_size: int = 100, seed: int = 0) -> Pairs:
    """An image-caption folder, or a toy set ``toy-images:benign-a|benign-b|contamination|harmful|world``."""
    name = _toy_set(spec, "--data")
    if name is not None:
        from resalign.data.toy import IMAGE_SETS

        ds = IMAGE_SETS[name](toy_size, TOY_DATA_SEEDS.get(name, 0))
        return Pairs(ds.images, list(ds.prompts), name)
    from resalign.data.folders import read_folder

    path = Path(spec)
    if not path.is_dir():
        raise DataError(f"fine-tuning data {spec!r}: no such folder (or name a toy set as toy-images:benign-a)")
    folder = read_folder(path, size=size)
    return Pairs(folder.images, folder.prompts, path.name)


def check_data_spec(spec: str, flag: str) -> None:
    """A ``--data``-style source names a toy set or an image-caption folder whose metadata parses."""
    if _toy_set(spec, flag) is not None:
        return
    if not Path(spec).is_dir():
        raise DataError(f"{flag} {spec!r}: no such folder (or name a toy set as toy-images:benign-a)")
    from resalign.data.folders import read_metadata

    read_metadata(spec)


def with_personalization_reference(options: Mapping[str, Mapping[str, Any]], scorers: Sequence[str],
                                   data: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``--scorer-option`` tables in which each scorer in use that compares images with the
    personalization set (``personalization_reference``: ``clip-i``, ``dino``) and has no ``reference``
    gets the first ``--data`` image-caption folder, the images the model is fine-tuned on."""
    from resalign.registry import get_registry

    out = {k: dict(v) for k, v in options.items()}
    folder = next((d for d in data if _toy_set(d, "--data") is None and Path(d).is_dir()), None)
    if folder is None:
        return out
    registry = get_registry()
    for name in dict.fromkeys(scorers):
        if getattr(registry.get("scorer", name), "personalization_reference", False) \
                and not out.get(name, {}).get("reference"):
            out.setdefault(name, {})["reference"] = str(folder)
    return out


@dataclass
class Plan:
    """Everything an attack needs, resolved and validated before any fine-tuning starts."""

    spec: FinetuneSpec
    stages: list[Stage]
    eval_every: int
    dataset: str
    prior: Pairs | None
    notes: list[str]


def plan_attack(cfg: Any, bundle: Any, preset: str) -> Plan:
    """Resolve data, schedule and fine-tuning spec of ``cfg`` (an attack's settings); every input error
    surfaces here."""
    adapter_class(cfg.adapt)
    if cfg.seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {cfg.seeds}")
    p = preset_named(preset).attack
    steps = cfg.ft_steps if cfg.ft_steps is not None else p.ft_steps
    eval_every = cfg.eval_every if cfg.eval_every is not None else p.eval_every
    if eval_every < 0:
        raise ConfigError(f"--eval-every must be >= 0, got {eval_every}")
    escape = parse_escape(cfg.escape)
    spec = FinetuneSpec(
        adapt=cfg.adapt,
        steps=steps,
        lr=cfg.lr if cfg.lr is not None else preset_lr(p, cfg.adapt),
        optimizer=cfg.optimizer,
        batch_size=cfg.batch_size,
        lora_rank=cfg.lora_rank,
        class_prompt=cfg.class_prompt,
        escape_p=escape[0] if escape else None,
        escape_lambda=escape[1] if escape else 0.5,
    ).validate()
    data_specs = list(cfg.data)
    if not data_specs:
        if preset != "toy":
            raise ConfigError("--data DIR is required (an image-caption folder with metadata.jsonl)")
        data_specs = [TOY_DATA_PREFIX + "benign-a"]
    if len(data_specs) > 2:
        raise ConfigError("--data is given at most twice (the second is the second benign stage of --progressive)")
    if len(data_specs) == 2 and not cfg.progressive:
        raise ConfigError("a second --data is only used with --progressive")
    size = bundle.image_size
    toy_n = p.toy_data_size
    data = [load_pairs(d, size=size, toy_size=toy_n) for d in data_specs]
    harmful = None
    if cfg.harmful_data:
        harmful = load_pairs(cfg.harmful_data, size=size, toy_size=toy_n)
    notes: list[str] = []
    if cfg.contaminate is not None:
        if harmful is None:
            raise ConfigError("--contaminate needs --harmful-data DIR (the pairs mixed in)")
        if cfg.progressive:
            raise ConfigError("--contaminate and --progressive are separate experiments; choose one")
    if cfg.progressive and harmful is None:
        raise ConfigError("--progressive needs --harmful-data DIR (its last two stages)")
    if cfg.progressive:
        if steps < 4:
            raise ConfigError(f"--progressive splits --steps into 4 stages; got {steps} steps")
        stages = _progressive_stages(cfg, bundle, data, harmful, steps)
        dataset = "progressive(" + "+".join(d.name for d in data) + f"->{harmful.name})"
        notes.append("stages: " + ", ".join(f"{s.name} ({s.steps} steps)" for s in stages))
    else:
        d = data[0]
        if cfg.contaminate is not None:
            d = contaminate(d, harmful, cfg.contaminate, seed=cfg.seed)
            notes.append(f"{cfg.contaminate:.0%} of {data[0].name} replaced by {harmful.name} pairs")
        stages = [Stage(d, steps, d.name)]
        dataset = d.name
    prior = None
    if cfg.prior_data and uses_prior(cfg.adapt):
        prior = load_pairs(cfg.prior_data, size=size, toy_size=toy_n)
    elif cfg.prior_data:
        raise ConfigError(f"--prior-data: --adapt {cfg.adapt} trains on no prior pairs (e.g. --adapt dreambooth does)")
    return Plan(spec, stages, eval_every, dataset, prior, notes)


def _progressive_stages(cfg: Any, bundle: Any, data: list[Pairs], harmful: Pairs, steps: int) -> list[Stage]:
    """Four equal stages: benign, benign (second set), the less harmful half, all harmful data."""
    from resalign.eval.scoring.run import create_scorer, harm_scores

    preset = preset_name(bundle)
    name = (cfg.scorers or ["toy-harm" if preset == "toy" else "nudenet"])[0]
    scorer = create_scorer(name, cfg.scorer_options.get(name))
    order = np.argsort(harm_scores(scorer.score(np.asarray(harmful.images), list(harmful.prompts))), kind="stable")
    low = order[: max(1, len(order) // 2)]
    milder = Pairs(np.asarray(harmful.images)[low], [harmful.prompts[i] for i in low], f"{harmful.name}-milder-half")
    second = data[1] if len(data) > 1 else data[0]
    q = [steps // 4] * 4
    q[-1] += steps - sum(q)
    return [
        Stage(data[0], q[0], data[0].name),
        Stage(second, q[1], second.name),
        Stage(milder, q[2], milder.name),
        Stage(harmful, q[3], harmful.name),
    ]
