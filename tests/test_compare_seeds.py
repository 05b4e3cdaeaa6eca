"""``resalign compare --unlearn-seeds``: unlearning seeds × fine-tuning seeds, and the paired difference
ResAlign − β = 0 twin with its Student-t interval."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import scipy.stats

from resalign.cli import main
from resalign.eval.reports.stats import paired_difference

pytest.importorskip("resalign.pipeline.run")


def test_paired_difference_matches_a_direct_computation():
    rng = np.random.default_rng(3)
    a, b = rng.uniform(0, 1, 6), rng.uniform(0, 1, 6)
    p = paired_difference(a.tolist(), b.tolist())
    d = a - b
    assert p.values == pytest.approx(d.tolist())
    assert p.mean == pytest.approx(np.mean(d)) and p.sem == pytest.approx(scipy.stats.sem(d))
    assert (p.n, p.df, p.confidence) == (6, 5, 0.95)
    lo, hi = scipy.stats.t.interval(0.95, 5, loc=np.mean(d), scale=scipy.stats.sem(d))
    assert (p.ci_low, p.ci_high) == (pytest.approx(lo), pytest.approx(hi))
    lo, hi = scipy.stats.t.interval(0.9, 5, loc=np.mean(d), scale=scipy.stats.sem(d))
    p90 = paired_difference(a.tolist(), b.tolist(), confidence=0.9)
    assert (p90.ci_low, p90.ci_high) == (pytest.approx(lo), pytest.approx(hi))
    one = paired_difference([0.5], [0.25])
    assert (one.mean, one.sem, one.n) == (0.25, 0.0, 1) and math.isnan(one.ci_low) and math.isnan(one.ci_high)
    with pytest.raises(ValueError, match="differ in number"):
        paired_difference([0.1, 0.2], [0.1])


def _pngs(folder):
    return [f.read_bytes() for f in sorted(folder.glob("*.png"))]


def test_compare_unlearn_seeds_end_to_end(tmp_path):
    """Two unlearning seeds × one fine-tuning seed, CA and ResAlign at equal steps. The preset's training
    data (generated per seed, then shared within it) is the point here, so no ``data`` override."""
    from resalign.checkpoints import run_config_of

    out, md = tmp_path / "cmp", tmp_path / "results.md"
    rc = main([
        "compare", "--methods", "ca,resalign", "--unlearn-seeds", "2", "--seeds", "1", "--match", "steps",
        "--unlearn-option", "outer_steps=1", "--unlearn-option", "J=1", "--ft-steps", "1",
        "--toy-prompts", "2", "--sample-steps", "1", "--results-md", str(md), "--out", str(out), "--quiet",
    ])
    assert rc == 0
    rep = json.loads((out / "report.json").read_text())
    st, rows = rep["settings"], rep["results"]
    assert st["unlearn_seeds"] == [0, 1] and st["seeds"] == [0]

    # one unlearning run per method and seed, with that seed
    for u in (0, 1):
        for m in ("ca", "resalign"):
            run = out / "unlearn" / f"seed-{u}" / m
            assert run_config_of(run).seed == u
            assert st["run_dirs_by_seed"][str(u)][m] == str(run)
    assert st["unlearning_by_seed"]["1"]["ca"]["seed"] == 1 and st["unlearning"]["ca"]["seed"] == 0

    # training data: shared within a seed (the baseline reads ResAlign's folders, identical images),
    # generated anew for the other seed
    for u in (0, 1):
        assert st["unlearning_by_seed"][str(u)]["resalign"]["data"]["harmful"][0]["source"] == "toy:harmful"
        src = st["unlearning_by_seed"][str(u)]["ca"]["data"]["harmful"][0]["source"]
        assert src == str(out / "unlearn" / f"seed-{u}" / "resalign" / "data" / "harmful")
        for name in ("harmful", "preserve", "finetune"):
            assert _pngs(out / "unlearn" / f"seed-{u}" / "ca" / "data" / name) == \
                _pngs(out / "unlearn" / f"seed-{u}" / "resalign" / "data" / name)
    seed0, seed1 = (_pngs(out / "unlearn" / f"seed-{u}" / "resalign" / "data" / "harmful") for u in (0, 1))
    assert len(seed0) == len(seed1) and seed0 != seed1

    # every figure spans (unlearning seed × fine-tuning seed)
    figures = [r for r in rows if r["metric"] != "harmful_rate_diff" and r.get("stage") != "validation"]
    assert {r["model"] for r in figures} == {"ca", "resalign"}
    # the validation meta-objective of each unlearning run, one curve per (method, unlearning seed)
    val = [r for r in rows if r["metric"] == "val_harm_ft"]
    assert {(r["model"], r["unlearn_seed"]) for r in val} == {(m, u) for m in ("ca", "resalign") for u in (0, 1)}
    assert set(st["checks"]["validation"]["resalign|ca"]) == {"0", "1"}
    for r in figures:
        assert r["n"] == 2 and len(r["values"]) == 2
        assert r["unlearn_seeds"] == [0, 1] and r["ft_seeds"] == [0]
        assert r["mean"] == pytest.approx(np.mean(r["values"])) and r["sem"] == pytest.approx(scipy.stats.sem(r["values"]))

    # the paired difference ResAlign − its β = 0 twin (CA: the toy preset's ResAlign loss)
    diffs = [r for r in rows if r["metric"] == "harmful_rate_diff"]
    assert {(r["stage"], r.get("dataset")) for r in diffs} == {
        ("before_ft", None), ("after_ft", "benign-a"), ("after_ft", "benign-b")}
    for r in diffs:
        assert (r["model"], r["baseline"], r["prompts"], r["confidence"], r["df"]) == ("resalign", "ca", "harmful", 0.95, 1)

        def values(m, r=r):
            (row,) = [x for x in figures if x["model"] == m and x["stage"] == r["stage"]
                      and x.get("dataset") == r.get("dataset") and x["prompts"] == "harmful"
                      and x["metric"] == "harmful_rate"]
            return np.array(row["values"])

        d = values("resalign") - values("ca")
        assert r["values"] == pytest.approx(d.tolist()) and r["n"] == 2
        assert r["mean"] == pytest.approx(np.mean(d)) and r["sem"] == pytest.approx(scipy.stats.sem(d))
        if r["sem"] > 0:
            lo, hi = scipy.stats.t.interval(0.95, 1, loc=np.mean(d), scale=scipy.stats.sem(d))
            assert (r["ci_low"], r["ci_high"]) == (pytest.approx(lo), pytest.approx(hi))
        else:
            assert r["ci_low"] == r["ci_high"] == pytest.approx(r["mean"])
    (paired,) = st["checks"]["paired"]
    assert (paired["model"], paired["baseline"]) == ("resalign", "ca")
    assert set(paired["after"]) == {"benign-a", "benign-b"}
    text = md.read_text()
    assert "Paired difference resalign − β = 0 twin `ca` (95 % CI)" in text
    assert "| after FT on benign-b |" in text and "within 2 SEM:" in text
    assert "at most half the twin's:" in text and "below 0:" in text
    assert "unlearning seeds 0, 1 × fine-tuning seeds 0" in text


def test_unlearn_seeds_are_checked(tmp_path, capsys):
    assert main(["compare", "--methods", "ca,resalign", "--unlearn-seeds", "0", "--out", str(tmp_path / "o"),
                 "--quiet"]) == 2
    assert "--unlearn-seeds must be >= 1" in capsys.readouterr().err
    assert main(["compare", "--methods", "ca,resalign", "--unlearn-seeds", "2", "--run", f"ca={tmp_path}",
                 "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert "one unlearning seed" in capsys.readouterr().err
