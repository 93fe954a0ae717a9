"""docs/results.md headings are unique; ``tta-server eval`` logs one line per corruption off a terminal."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from tta_server.evaluation.cli import LogProgress
from tta_server.evaluation.report import GroupKey, build_report, load_results

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "shift"


def test_subset_and_full_groups_get_different_titles() -> None:
    full = GroupKey("resnet20", "../shared/data/cifar10-jpeg/test", "aaaa", 5, 10_000, 10_000)
    subset = GroupKey("resnet20", "../shared/data/cifar10-jpeg/test", "bbbb", 5, 1_000, 10_000)
    assert full.title() == "resnet20 on cifar10-jpeg/test, severity 5, all 10,000 images per corruption"
    assert subset.title().endswith("seeded subset of 1,000 of 10,000 images per corruption")


def test_the_committed_results_report_has_no_repeated_heading() -> None:
    report = build_report(load_results([RESULTS]))
    headings = [line for line in report.splitlines() if line.startswith("## ")]
    assert len(headings) >= 2 and len(headings) == len(set(headings))
    committed = (RESULTS.parents[2] / "docs" / "results.md").read_text()
    assert [line for line in committed.splitlines() if line.startswith("## ")] == headings


def test_log_progress_prints_one_line_per_corruption(caplog: pytest.LogCaptureFixture) -> None:
    progress = LogProgress()
    domains = ["gaussian_noise", "shot_noise", "fog"]
    with caplog.at_level(logging.INFO, logger="tta_server.eval"):
        progress.start(300, domains[0])
        for name in domains:
            for _ in range(10):  # ten batches of ten images per domain
                progress.advance(10, name)
        progress.advance(0, "shot_noise")  # a domain seen before is not announced again
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "stream of 300 images"
    assert lines[1:] == [
        "gaussian_noise (from image 1 of 300, 0% done)",
        "shot_noise (from image 101 of 300, 33% done)",
        "fog (from image 201 of 300, 67% done)",
    ]
