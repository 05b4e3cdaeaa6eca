"""One preset table: the defaults of every command come from ``resalign.settings.presets.PRESETS``."""

from __future__ import annotations

import dataclasses

import pytest

from resalign.errors import ConfigError
from resalign.eval.protocol.attack import preset_lr
from resalign.eval.scoring.evaluator import resolve_generation
from resalign.eval.scoring.presets import default_scorers
from resalign.eval.protocol.finetune import reference_lr
from resalign.settings.presets import PRESETS, preset_named
from resalign.settings.run import RunConfig, preset_of, resolve


def test_every_run_default_of_a_preset_is_a_run_config_setting():
    fields = {f.name for f in dataclasses.fields(RunConfig)}
    for preset in PRESETS.values():
        assert set(preset.run) <= fields, set(preset.run) - fields


def test_paper_is_the_sd_preset_under_every_command():
    assert preset_named("paper") is PRESETS["sd"]
    assert preset_of("/any/folder", "paper") == "sd"
    gen = resolve_generation("paper")
    assert (gen.images_per_prompt, gen.steps, gen.guidance) == (3, 30, 7.5)  # Sec. 4.1: 3 images, 30 steps, CFG 7.5
    assert default_scorers("paper", "harmful") == ["nudenet"]
    with pytest.raises(ConfigError, match=r"--preset 'sd3': expected one of toy, sd, sdxl"):
        preset_named("sd3")


def test_commands_read_their_defaults_from_the_one_table():
    toy = PRESETS["toy"]
    cfg = resolve(RunConfig())
    assert cfg.preset == "toy" and cfg.J == toy.run["J"] and cfg.data.sample_steps == toy.run["data"]["sample_steps"]
    gen = resolve_generation("toy")
    assert (gen.steps, gen.guidance) == (toy.evaluate.sample_steps, toy.evaluate.guidance)
    assert preset_lr(toy.attack, "lora") == pytest.approx(10.0 * reference_lr("lora"))
    assert preset_lr(PRESETS["sd"].attack, "lora") == pytest.approx(reference_lr("lora"))
