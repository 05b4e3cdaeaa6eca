"""The run's account of its simulations: counts, shares and warnings from metrics.jsonl rows."""

from __future__ import annotations

import pytest

from resalign.core.health import simulation_summary, summary_markdown


def _sim(correction=0.3, halvings=0, fallback=False, omega_lambda=0.98, **extra):
    return {"config": "full/adam/lr=0.0001/T=30/denoise", "correction": correction, "halvings": halvings,
            "fallback": fallback, "omega_lambda": omega_lambda, "harm_ft": 0.01, **extra}


def test_summary_counts_drops_halvings_fallbacks_and_first_order_solves():
    rows = [
        {"step": 1, "simulations": [_sim(), _sim(halvings=1, omega_lambda=0.49)]},
        {"step": 2, "simulations": [_sim(correction=0.0, halvings=5, fallback=True, omega_lambda=0.03),
                                    {"config": "full/sgd/lr=0.1/T=10/denoise", "dropped": "simulated fine-tuning diverged"}]},
        {"step": 3, "simulations": [_sim(correction=0.01)]},
    ]
    s = simulation_summary(rows)
    assert (s["simulations"], s["kept"], s["dropped"], s["solved"]) == (5, 4, 1, 4)
    assert (s["halved"], s["fallback"], s["first_order"]) == (2, 1, 2)
    assert s["dropped_share"] == pytest.approx(0.2) and s["first_order_share"] == pytest.approx(0.5)
    assert s["median_omega_lambda"] == pytest.approx((0.49 + 0.98) / 2)
    assert s["dropped_list"] == [{"step": 2, "config": "full/sgd/lr=0.1/T=10/denoise",
                                  "reason": "simulated fine-tuning diverged"}]
    assert s["warnings"] == []  # half first-order is not "most"
    text = "\n".join(summary_markdown(s))
    assert "| 2 | full/sgd/lr=0.1/T=10/denoise | simulated fine-tuning diverged |" in text
    rows[1]["simulations"][1]["dropped"] = "outlier: |L_harm(θ_FT)| = 5 exceeds 10x"
    table = [line for line in summary_markdown(simulation_summary(rows)) if line.startswith("| 2 |")]
    assert table == ["| 2 | full/sgd/lr=0.1/T=10/denoise | outlier: \\|L_harm(θ_FT)\\| = 5 exceeds 10x |"]


def test_summary_warns_when_most_hypergradients_were_first_order_or_everything_was_dropped():
    rows = [{"step": 1, "simulations": [_sim(correction=0.0, halvings=5, fallback=True), _sim(correction=0.02)]}]
    (warning,) = simulation_summary(rows)["warnings"]
    assert "2 of 2 hypergradients were in effect first-order" in warning
    rows = [{"step": 1, "simulations": [{"config": "c", "dropped": "x"}]}]
    assert "every simulated fine-tuning was dropped" in simulation_summary(rows)["warnings"][0]
    # first-order's own estimates carry no correction: nothing to warn about, no solve counted
    rows = [{"step": 1, "simulations": [{"config": "c", "harm_ft": 0.1, "hypergrad_norm": 1.0}]}]
    s = simulation_summary(rows)
    assert s["solved"] == 0 and s["warnings"] == [] and s["median_omega_lambda"] is None
    assert simulation_summary([{"step": 1}])["simulations"] == 0 and summary_markdown(simulation_summary([])) == []
