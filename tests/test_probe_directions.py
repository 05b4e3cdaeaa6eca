"""``resalign ablate directions``: the paired direction probe (resalign.eval.ablation.probes)."""

from __future__ import annotations

import json

import torch
from test_run_cli import run

from resalign.cli import main
from resalign.eval.ablation.probes import ProbeSettings, probe


def test_probe_is_paired_a_zero_step_changes_nothing_and_every_direction_is_reported(tiny_toy_dir, tmp_path):
    assert run(tiny_toy_dir, tmp_path / "run", "--outer-steps", "1") == 0
    out = tmp_path / "probe"
    assert main(["ablate", "directions", str(tmp_path / "run"), "--directions", "twin,harm,h:first-order,random",
                 "--attack-seeds", "2", "--ft-steps", "2", "-J", "1", "--eval-pairs", "2", "--step-sizes", "0.1,0.3",
                 "--quiet", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    rows = report["results"]
    assert {(r["method"], r["step_size"]) for r in rows} == {
        (d, e) for d in ("twin", "harm", "h:first-order", "random") for e in (0.1, 0.3)}
    assert all(r["n"] == 2 and len(r["values"]) == 2 for r in rows)
    assert report["settings"]["step"] == 1 and "twin|harm" in report["settings"]["cosines"]
    assert "| h:first-order | 0.3 |" in (out / "report.md").read_text()
    # unknown directions fail before any work
    assert main(["ablate", "directions", str(tmp_path / "run"), "--directions", "sideways", "--quiet",
                 "--out", str(tmp_path / "bad")]) == 2


class _Trainer:
    """θ and W(θ) = θ: enough of a trainer for :func:`probe`."""

    def __init__(self):
        self.theta = {"w": torch.tensor([1.0, -2.0])}
        self.param = type("P", (), {"merged": staticmethod(lambda t: {k: v.detach().clone() for k, v in t.items()})})()


def test_probe_pairs_each_direction_with_the_attack_of_theta_under_the_same_seed():
    # attack: a seeded random walk; harm: the squared norm. A zero direction must read exactly 0 before and
    # after the attack (same seed, same walk); a step changes L by the closed form before the attack.
    def attack(w, seed):
        g = torch.Generator().manual_seed(seed)
        return {"w": w["w"] + torch.randn(2, generator=g)}

    def evaluate(w):
        return float((w["w"] ** 2).sum())

    dirs = {"zero": {"w": torch.zeros(2)}, "down": {"w": torch.tensor([-1.0, 2.0])}}
    results, base = probe(_Trainer(), dirs, ProbeSettings(step_sizes=[0.5], attack_seeds=3), attack, evaluate)
    zero, down = results
    assert zero.pre == [0.0] * 3 and zero.post == [0.0] * 3
    unit = torch.tensor([-1.0, 2.0]) / 5 ** 0.5
    w = torch.tensor([1.0, -2.0]) + 0.5 * unit
    assert abs(down.pre[0] - (float((w ** 2).sum()) - 5.0)) < 1e-6
    for s, post in enumerate(down.post):
        g = torch.Generator().manual_seed(s)
        walk = torch.randn(2, generator=g)
        assert abs(post - (float(((w + walk) ** 2).sum()) - base["harm_attacked"][s])) < 1e-5


def test_init_warm_starts_theta_from_an_unlearned_model_and_refuses_one_that_differs_outside_theta(
        tiny_toy_dir, tmp_path):
    from resalign.errors import ConfigError
    from resalign.models.bundle import T2IBundle
    from resalign.pipeline.prepare import prepare
    from resalign.settings.run import load_run_config
    from test_run_cli import SMALL

    assert run(tiny_toy_dir, tmp_path / "twin", "--outer-steps", "1", "--beta", "0") == 0
    from resalign.cli.run import apply_set_items

    sets = apply_set_items({}, [item for i, item in enumerate(SMALL) if i and SMALL[i - 1] == "--set"])
    raw = {"model": str(tiny_toy_dir), "init": str(tmp_path / "twin"), "params": "xattn", "J": 1}
    cfg = load_run_config({**sets, **raw})
    trainer = prepare(cfg, tmp_path / "data").trainer
    twin = T2IBundle.load(tmp_path / "twin" / "model").unet.state_dict()
    base = T2IBundle.load(tiny_toy_dir).unet.state_dict()
    moved = [k for k in trainer.theta if not torch.equal(twin[k], base[k])]
    assert moved and all(torch.equal(trainer.theta[k].detach(), twin[k].float()) for k in trainer.theta)
    # a model that differs from the base outside θ cannot start a cross-attention θ
    import dataclasses

    from resalign.pipeline.prepare import warm_start

    other = T2IBundle.load(tmp_path / "twin" / "model")
    with torch.no_grad():
        next(p for n, p in other.unet.named_parameters() if n not in trainer.theta).add_(1.0)
    try:
        warm_start(trainer, other, "other")
    except ConfigError as exc:
        assert "outside θ" in str(exc)
    else:
        raise AssertionError("a model differing outside θ was accepted")
    assert dataclasses.is_dataclass(cfg)
