"""compare: the validation meta-objective of ResAlign and its β = 0 twin, read from their runs' metrics."""

from __future__ import annotations

import json

from resalign.core.heldout import curve
from resalign.eval.reports.validation import validation_checks, validation_figure, validation_lines
from resalign.eval.reports.tidy import TidyReport


def _val(step, harm_ft):
    return {"step": step, "harm": 0.01, "harm_ft": harm_ft, "rebound": harm_ft - 0.01, "mse": 0.1, "mse_ft": 0.1,
            "ft_before": 0.2, "ft_after": 0.19}


def _run(path, finals):
    path.mkdir()
    rows = [{"step": 1, "validation_initial": _val(0, 0.05), "validation": _val(1, finals[0])},
            {"step": 2}, {"step": 3, "validation": _val(3, finals[1])}]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 4, "valid')
    return str(path)


def test_validation_curves_and_the_30_percent_check_per_unlearning_seed(tmp_path):
    dirs = {0: {"resalign": _run(tmp_path / "r0", (0.04, 0.020)), "ca": _run(tmp_path / "c0", (0.05, 0.030))},
            1: {"resalign": _run(tmp_path / "r1", (0.04, 0.025)), "ca": _run(tmp_path / "c1", (0.05, 0.030))}}
    assert [p["step"] for p in curve(json.loads(x) for x in (tmp_path / "r0" / "metrics.jsonl").read_text()
                                     .splitlines()[:3])] == [0, 1, 3]
    report = TidyReport("compare")
    checks = validation_checks(report, dirs, [("resalign", "ca")])["resalign|ca"]
    assert checks["0"]["below_30pct"] and not checks["1"]["below_30pct"]  # -33 % and -17 %
    assert abs(checks["0"]["relative"] - (0.020 - 0.030) / 0.030) < 1e-12 and checks["0"]["step"] == 3
    assert len(report.rows(metric="val_harm_ft", model="ca", unlearn_seed=1)) == 3
    assert validation_figure(tmp_path, report)[1] == "validation.png" and (tmp_path / "validation.png").is_file()
    lines = validation_lines({"validation": {"resalign|ca": checks}})
    assert len(lines) == 2 and "at least 30 % below: yes" in lines[0] and "no" in lines[1]


def test_a_partial_data_table_of_the_unlearning_runs_keeps_the_presets_other_sets():
    from resalign.pipeline.compare import method_run_config
    from resalign.settings.presets import PRESETS
    from resalign.settings.run import resolve

    finetune = [{"source": "toy:preservation", "n": 64, "seed": 2}]
    cfg = resolve(method_run_config("resalign-ga", None, 1, {"data": {"finetune": finetune}, "J": 4}, "cpu", "fp32"))
    preset = PRESETS["toy"].run["data"]
    assert [s.source for s in cfg.data.finetune] == ["toy:preservation"] and cfg.J == 4 and cfg.seed == 1
    assert [s.source for s in cfg.data.harmful] == [s["source"] for s in preset["harmful"]]
    assert cfg.data.concept == preset["concept"] and cfg.loss == "ga"
