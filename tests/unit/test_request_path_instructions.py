"""The instruction-count request-path benchmark: reading callgrind's totals, the report, a missing valgrind."""

from __future__ import annotations

import asyncio
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
    report = bench.report_of(
        {"tta-server": [24_170_000.0, 24_150_000.0, 24_190_000.0], "plain": [23_690_000.0] * 3}, 60
    )
    assert report["instructions_per_request"] == {"tta-server": 24_170_000.0, "plain": 23_690_000.0}
    assert report["minus_plain"] == {"tta-server": 480_000.0}
    assert report["repeats"] == 3
    text = bench.render(report)
    assert "| tta-server | 24.170 | 24.150-24.190 | +0.480 | +2.03% |" in text
    assert "| plain | 23.690 | 23.690-23.690 | - | - |" in text
    assert "counted 3 times" in text


def test_without_valgrind_it_refuses_clearly(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("shutil.which", lambda _: None)
    with pytest.raises(SystemExit) as stopped:
        bench.main(["--requests", "1"])
    assert stopped.value.code == 2
    assert "valgrind is not installed" in capsys.readouterr().err


def test_the_counted_requests_run_inline_as_on_a_server(monkeypatch: pytest.MonkeyPatch, shared_dir: Path) -> None:
    """Under valgrind a forward takes over a second, beyond any settable inline bound: the child lifts it
    itself and refuses to report a count whose batches went to the worker thread instead."""
    monkeypatch.setattr(bench, "_count", lambda on: None)  # no valgrind here: nothing to switch
    monkeypatch.setattr(bench, "WARM_UP", 2)
    monkeypatch.setattr("torch.set_num_threads", lambda n: None)  # the child's one thread, not this process's
    models_dir = shared_dir / "models"
    root = Path(__file__).resolve().parents[2]
    asyncio.run(bench._child("tta", root, models_dir, requests=3))
    monkeypatch.setenv("TTA_INLINE_MAX_IMAGES", "0")  # every batch on the worker thread
    with pytest.raises(RuntimeError, match="3 counted batches ran on the worker thread"):
        asyncio.run(bench._child("tta", root, models_dir, requests=3))
