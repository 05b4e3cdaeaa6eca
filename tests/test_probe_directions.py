"""``resalign ablate directions``: the paired direction probe (resalign.eval.probes)."""

from __future__ import annotations

import json

import torch
from test_run_cli import run

from resalign.cli import main
from resalign.eval.probes import ProbeSettings, probe


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
