"""The validation meta-objective (resalign.core.heldout) and common random numbers for L_harm."""

from __future__ import annotations

import torch
from fixtures.tiny import tiny_context
from test_core_meta import _trainer

from resalign.components import FinetuneConfig
from resalign import seeds
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


def test_halving_shrinks_only_that_simulations_beta_part(monkeypatch):
    """The authors' safeguard: h_j enters with weight 2^-k after k halvings; a fallback is dropped."""
    import resalign.core.meta as meta
    from resalign.core import tree
    from resalign.core.problem import simulate

    calls = []

    def marked(*args, **kwargs):
        h, info = simulate(*args, **kwargs)
        calls.append(h)
        info.update(halvings=2 if len(calls) == 1 else 0, fallback=len(calls) == 3)
        return h, info

    monkeypatch.setattr(meta, "simulate", marked)
    tr = _trainer(tiny_context(), beta=0.6, solver="first-order", J=3, settings={"halving_shrinks_beta": True})
    _, metrics = tr.gradient()
    dropped = [s["dropped"] for s in metrics["simulations"] if "dropped" in s]
    assert metrics["dropped"] == 1 and "β part dropped" in dropped[0]
    expected = tree.scale(tree.add(tree.scale(calls[0], 0.25), calls[1]), 0.5)  # calls in run order
    assert abs(metrics["hypergrad_norm"] - tree.norm(expected)) < 1e-6 * tree.norm(expected)


def test_soft_cap_bounds_gradient_ascent_smoothly():
    from resalign.losses.harmful import GradientAscent

    ctx = tiny_context()
    tr = _trainer(ctx, beta=0.5, solver="first-order", J=1)
    theta = {k: v.detach().requires_grad_(True) for k, v in ctx.theta0.items()}
    batch = tr.data.harmful.sample(2, seeds.generator(0, "b"))
    plain = float(GradientAscent.make({})(ctx, theta, batch, seeds.generator(0, "n")).detach())
    cap = abs(plain) / 4  # well below the samples' error: the hard cap is flat there, the soft one is not
    hard = GradientAscent.make({"cap": cap})(ctx, theta, batch, seeds.generator(0, "n"))
    soft = GradientAscent.make({"cap": cap, "soft": True})(ctx, theta, batch, seeds.generator(0, "n"))
    assert -cap <= float(soft.detach()) < 0 and float(hard.detach()) >= -cap - 1e-12
    g_hard = torch.autograd.grad(hard, list(theta.values()), allow_unused=True)
    g_soft = torch.autograd.grad(soft, list(theta.values()), allow_unused=True)
    assert all(g is None or float(g.abs().max()) == 0.0 for g in g_hard)
    assert any(g is not None and float(g.abs().max()) > 0 for g in g_soft)


def test_late_sigmoid_alpha_starts_at_half_and_is_centred_at_three_quarters():
    from resalign.core.meta import MethodSettings

    s = MethodSettings(alpha=1.6, alpha_end=2.0, alpha_schedule="late-sigmoid", outer_steps=100)
    assert s.alpha_at(0) == s.alpha_at(49) == 1.6
    assert abs(s.alpha_at(75) - 1.8) < 1e-12 and abs(s.alpha_at(100) - 2.0) < 0.01


def test_a_pool_too_small_to_hold_pairs_out_is_a_clear_error():
    import pytest

    from resalign.errors import ConfigError

    full = _trainer(tiny_context(), beta=0.5, solver="first-order", J=1).data.finetune
    one = type(full)(x0=full.x0[:1], cond=full.cond[:1], prompts=full.prompts[:1])
    with pytest.raises(ConfigError, match="val_sims"):
        hold_out(one, 4, 0)
    train, held = hold_out(type(full)(x0=full.x0[:2], cond=full.cond[:2], prompts=full.prompts[:2]), 4, 0)
    assert len(train) == 1 and len(held) == 1
