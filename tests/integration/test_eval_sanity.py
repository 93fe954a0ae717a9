"""A small CI version of the accuracy-under-shift benchmark on real data and real weights.

A few corruptions and a few hundred images (seconds on 2 cores): the numbers must have the
right structure and point the right way, not match the full benchmark.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tta_server.evaluation.harness import EvalSpec, run_eval
from tta_server.evaluation.report import build_report, load_results
from tta_server.evaluation.results import EvalResult, write_result
from tta_server.shift.streams import Setting


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("eval-cache")


def evaluate(shared_dir: Path, cache: Path, **changes: Any) -> EvalResult:
    base: dict[str, Any] = {
        "model": "resnet20",
        "method": "source",
        "data": shared_dir / "data" / "cifar10_test_first846.npz",
        "models_dir": shared_dir / "models",
        "cache_dir": cache,
        "threads": 1,
    }
    base.update(changes)
    return run_eval(EvalSpec(**base))


def test_source_is_accurate_on_clean_images(shared_dir: Path, cache: Path) -> None:
    result = evaluate(shared_dir, cache, corruptions=("none",), batch_size=128)
    assert result.domains[0].n == 846
    assert result.mean_accuracy > 88.0, result.mean_accuracy


def test_severity_5_is_worse_than_severity_1(shared_dir: Path, cache: Path) -> None:
    corruptions = ("gaussian_noise", "defocus_blur", "fog")
    mild = evaluate(shared_dir, cache, corruptions=corruptions, severity=1, limit=300, batch_size=100)
    harsh = evaluate(shared_dir, cache, corruptions=corruptions, severity=5, limit=300, batch_size=100)
    assert harsh.mean_error > mild.mean_error + 5, (mild.mean_error, harsh.mean_error)
    assert [d.n for d in harsh.domains] == [300, 300, 300]


def test_bn_beats_source_on_contrast_5(shared_dir: Path, cache: Path, tmp_path: Path) -> None:
    common: dict[str, Any] = {"corruptions": ("contrast",), "severity": 5, "limit": 256, "batch_size": 64}
    source = evaluate(shared_dir, cache, **common)
    bn = evaluate(shared_dir, cache, method="bn", **common)
    assert bn.mean_error < source.mean_error - 10, (source.mean_error, bn.mean_error)

    runs = tmp_path / "runs"
    for result in (source, bn):
        write_result(result, runs)
    markdown = build_report(load_results([runs]), tmp_path / "results.md", tmp_path / "plots")
    assert "| source | iid | 64 |" in markdown and "| bn | iid | 64 |" in markdown
    assert len(list((tmp_path / "plots").glob("*.png"))) == 2


def test_streams_with_batch_size_one_and_mixed(shared_dir: Path, cache: Path) -> None:
    mixed = evaluate(shared_dir, cache, corruptions=("contrast", "fog"), setting=Setting.MIXED, limit=64, batch_size=1)
    assert mixed.n_batches == 128 and {d.n for d in mixed.domains} == {64}
    assert len(mixed.curve.positions) > 50 and mixed.curve.positions[-1] == 128
