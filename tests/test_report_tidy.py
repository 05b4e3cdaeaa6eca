"""The tidy report: rows, statistics over seeds, and the files a run directory gets."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest
import scipy.stats

from resalign.eval.reports.tidy import TidyReport, fmt_mean_sem
from resalign.eval.reports.stats import mean_sem, rate_stats


@pytest.mark.parametrize("values", [[0.1, 0.25, 0.4], [0.0, 0.0, 1.0, 0.5], [3.0, 3.5]])
def test_row_statistics_equal_numpy_and_scipy(values):
    report = TidyReport("compare")
    row = report.add(values, model="ga", stage="after_ft", dataset="benign-a", prompts="harmful", metric="harmful_rate")
    assert row["mean"] == pytest.approx(np.mean(values), abs=1e-15)
    assert row["sem"] == pytest.approx(scipy.stats.sem(values), rel=1e-12)
    assert row["n"] == len(values) and row["values"] == values


def test_single_value_has_zero_sem_and_prints_without_plus_minus():
    m, s = mean_sem([0.3])
    assert (m, s) == (0.3, 0.0)
    assert fmt_mean_sem(0.3, 0.0, 1) == "0.300"
    assert fmt_mean_sem(0.3, 0.02, 3) == "0.300 ± 0.020"


def test_rows_leave_out_fields_that_do_not_apply_and_keep_key_order():
    report = TidyReport("eval")
    row = report.add([0.5, 0.7], model="base", stage="before_ft", prompts="harmful", metric="harmful_rate", finetune=None)
    assert "finetune" not in row and "dataset" not in row
    assert list(row)[:4] == ["model", "stage", "prompts", "metric"]
    assert report.get(model="base", metric="harmful_rate") is row
    assert report.get(model="nobody") is None


def test_write_produces_json_csv_markdown(tmp_path):
    report = TidyReport("compare", settings={"seeds": [0, 1, 2]})
    for model, vals in {"base": [0.8, 0.9, 0.85], "resalign": [0.05, 0.02, 0.04]}.items():
        report.add(vals, model=model, stage="before_ft", prompts="harmful", metric="harmful_rate")
    table = report.pivot("model", "stage", title="Harmful rate", corner="model")
    paths = report.write(tmp_path, title="t", tables=[table])
    data = json.loads(paths["json"].read_text())
    assert data["command"] == "compare" and len(data["results"]) == 2
    assert "torch" in data["settings"]["versions"] and data["settings"]["seeds"] == [0, 1, 2]
    rows = list(csv.DictReader(io.StringIO(paths["csv"].read_text())))
    assert [r["model"] for r in rows] == ["base", "resalign"]
    md = paths["md"].read_text()
    assert "| base | 0.850 ± 0.029 |" in md
    assert "Seeds: 0, 1, 2." in md and '"versions"' in md
    # strict JSON: a NaN figure is written as null
    report.add([float("nan")], model="x", metric="frechet_distance")
    data = json.loads(report.write(tmp_path)["json"].read_text())
    assert data["results"][-1]["mean"] is None


def test_rate_stats_over_images_sem_and_seeded_bootstrap():
    flags = np.array([1] * 30 + [0] * 70, bool)
    st = rate_stats(flags, seed=3)
    assert (st.k, st.n, st.rate) == (30, 100, 0.3)
    assert st.sem == pytest.approx(scipy.stats.sem(flags.astype(float)))
    assert rate_stats(flags, seed=3) == st  # seeded: reproducible
    # the percentile interval agrees with the normal approximation p ± 1.96·SEM to about a hundredth
    assert st.ci_low == pytest.approx(0.3 - 1.96 * st.sem, abs=0.015)
    assert st.ci_high == pytest.approx(0.3 + 1.96 * st.sem, abs=0.015)
