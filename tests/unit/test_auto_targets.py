"""benchmarks.auto_targets: `auto` against `source` and the best single method, per setting."""

from __future__ import annotations

from pathlib import Path

from benchmarks.auto_targets import main, verdicts
from tests.unit.test_evaluation import fake_result
from tta_server.evaluation.report import group_rows
from tta_server.evaluation.results import write_result


def test_verdicts_compare_auto_with_source_and_the_best_single_method(tmp_path: Path) -> None:
    runs = [
        fake_result("source", "iid", 64, {"fog": 50.0}),
        fake_result("bn", "iid", 64, {"fog": 30.0}),
        fake_result("auto", "iid", 64, {"fog": 31.0}),  # within 2 of bn, far below source: met
        fake_result("source", "correlated", 64, {"fog": 50.0}),
        fake_result("bn", "correlated", 64, {"fog": 80.0}),
        fake_result("auto", "correlated", 64, {"fog": 51.0}),  # 1 point worse than source: not met
        fake_result("bn", "continual", 16, {"fog": 40.0}),  # no auto here: not compared
    ]
    found = verdicts(group_rows(runs))
    assert [(v.setting, v.best_label, v.best, v.met) for v in found] == [
        ("iid", "bn", 30.0, True),
        ("correlated", "source", 50.0, False),
    ]
    for run in runs:
        write_result(run, tmp_path / "runs")
    out = tmp_path / "auto_targets.md"
    assert main([str(tmp_path / "runs"), "--out", str(out)]) == 1  # one setting misses
    assert "| resnet20 | 100 per corruption, severity 5 | correlated | 64 | 50.0 | **51.0** |" in out.read_text()
