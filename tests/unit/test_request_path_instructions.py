"""The instruction-count request-path benchmark: reading callgrind's totals, the report, a missing valgrind."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import request_path_instructions as bench


def test_the_total_is_read_from_the_totals_line(tmp_path: Path) -> None:
    out = tmp_path / "run.callgrind"
    out.write_text("version: 1\nevents: Ir\nsummary: 0\nfn=(1) main\n3 120\ntotals: 1450092910\n")
    assert bench.callgrind_totals(out) == 1450092910
    out.write_text("version: 1\nevents: Ir\n")
    with pytest.raises(ValueError, match="no 'totals:' line"):
        bench.callgrind_totals(out)


def test_the_report_gives_each_app_and_its_difference_to_plain() -> None:
    report = {
        "date": "2026-12-04",
        "requests": 60,
        "instructions_per_request": {"tta-server": 24_170_000.0, "plain": 23_690_000.0},
        "minus_plain": {"tta-server": 480_000.0},
    }
    text = bench.render(report)
    assert "| tta-server | 24.170 | +0.480 | +2.0% |" in text
    assert "| plain | 23.690 | - | - |" in text


def test_without_valgrind_it_refuses_clearly(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("shutil.which", lambda _: None)
    with pytest.raises(SystemExit) as stopped:
        bench.main(["--requests", "1"])
    assert stopped.value.code == 2
    assert "valgrind is not installed" in capsys.readouterr().err
