"""The validation meta-objective (resalign.core.heldout) and common random numbers for L_harm."""

from __future__ import annotations

import torch
from fixtures.tiny import tiny_context
from test_core_meta import _trainer

from resalign.components import FinetuneConfig
from resalign.core import seeds
from resalign.core.heldout import hold_out
from resalign.core.problem import SimulationData, build_hypergrad_problem
from resalign.registry import get_registry


def _rows(pairs) -> set[bytes]:
    return {x.numpy().tobytes() for x in pairs.x0}


def _val_trainer(**kw):
    settings = {"val_sims": 3, "val_pairs": 1, "val_every": 1, **kw.pop("settings", {})}
    return _trainer(tiny_context(), beta=0.5, solver="first-order", J=1, settings=settings, **kw)


def test_validation_draws_are_disjoint_from_training_draws():
    tr = _val_trainer()
    full = _trainer(tiny_context(), beta=0.5, solver="first-order", J=1).data.finetune
    train, held = _rows(tr.data.finetune), _rows(hold_out(full, 1, tr.settings.seed)[1])
    assert len(held) == 1 and len(train) == len(full) - 1
    assert not train & held and train | held == _rows(full)
    for sim in tr.validation.sims:  # every validation D_FT pair comes from the held-out ones
        assert _rows(sim.ft) <= held
    for step in range(3):  # and every training D_FT draw from the rest
        for j in range(2):
            ft = tr.simulation_data(step, j, tr.pool.configs()[0], None).ft
            assert not _rows(ft) & held


def test_validation_is_measured_on_schedule_and_identical_after_a_resume():
    a = _val_trainer(settings={"val_every": 2, "outer_steps": 3})
    rows = [a.outer_step() for _ in range(3)]
    assert "validation_initial" in rows[0] and rows[0]["validation_initial"]["step"] == 0
    assert [("validation" in r) for r in rows] == [False, True, True]  # every 2 steps and the last
    v = rows[1]["validation"]
    assert v["rebound"] == sum(s["harm_ft"] - v["harm"] for s in v["simulations"]) / 3
    b = _val_trainer(settings={"val_every": 2, "outer_steps": 3})
    b.outer_step()
    c = _val_trainer(settings={"val_every": 2, "outer_steps": 3})
    c.load_state_dict(b.state_dict())
    resumed = [c.outer_step() for _ in range(2)]
    for key in ("harm", "harm_ft", "rebound", "mse", "mse_ft", "ft_before", "ft_after"):
        assert resumed[0]["validation"][key] == v[key], key
        assert resumed[1]["validation"][key] == rows[2]["validation"][key], key


def test_validation_set_changes_with_theta_not_with_the_training_step():
    tr = _val_trainer()
    w = tr.param.weights(tr.theta)
    first, again = tr.validation.measure(w, 0), tr.validation.measure(w, 7)
    assert first["harm_ft"] == again["harm_ft"] and first["rebound"] == again["rebound"]
    moved = {k: v.detach() + 0.05 * torch.randn_like(v) for k, v in w.items()}
    assert tr.validation.measure(moved, 0)["harm"] != first["harm"]


def _problem(harm_noise, lr):
    ctx = tiny_context()
    tr = _trainer(ctx, beta=0.5, solver="first-order", J=1)
    reg = get_registry()
    theta = {k: v.detach() for k, v in ctx.theta0.items()}
    harm = tr.data.harmful.sample(2, seeds.generator(0, 0, "harm-data"))
    ft = tr.data.finetune.sample(2, seeds.generator(0, 0, 0, "ft-data"))
    config = FinetuneConfig(adapter="full", lr=lr, steps=2, optimizer="sgd", finetune_loss="denoise", batch_size=2)
    _, info = build_hypergrad_problem(
        ctx, theta, config, SimulationData(ft=ft, harm=harm), adapter=reg.create("adapter", "full"),
        finetune_loss=reg.create("finetune-loss", "denoise"), harmful_loss=tr.harmful_loss,
        seed=seeds.derive(0, 0, 0, "simulation"), harm_noise=harm_noise)
    with torch.no_grad():
        at_theta = float(tr.harmful_loss(ctx, theta, harm, seeds.generator(0, 0, "harm-noise")))
    return info["harm_ft"], at_theta


def test_common_random_numbers_give_a_zero_rebound_when_fine_tuning_does_not_move():
    harm_ft, at_theta = _problem((0, 0, "harm-noise"), lr=0.0)
    assert harm_ft - at_theta == 0.0
    # with the simulation's own noise the same unmoved θ_FT reads a different L_harm
    harm_ft, at_theta = _problem(None, lr=0.0)
    assert harm_ft != at_theta
    # and a fine-tuning that moves θ changes it under common noise
    harm_ft, at_theta = _problem((0, 0, "harm-noise"), lr=1e-1)
    assert harm_ft != at_theta
