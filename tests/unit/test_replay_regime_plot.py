"""The replay plot draws an ``auto`` stream's regime over time, and stays two panels otherwise."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tta_client.cli.plot import Curve, plot_replay

pytest.importorskip("matplotlib")


def test_regime_panel(tmp_path: Path) -> None:
    correct = np.array([True, False] * 8)
    auto = Curve("auto", correct, [4, 8, 12, 16], [1.0, 0.9, 0.8, 0.7], ["components", "batch_mix", None, "source"])
    plain = Curve("bn", correct, [4, 8, 12, 16], [1.0, 0.9, 0.8, 0.7])
    plot_replay([auto, plain], 8, "t", tmp_path / "a.png")
    plot_replay([plain], 8, "t", tmp_path / "b.png")
    assert (tmp_path / "a.png").stat().st_size > 0 and (tmp_path / "b.png").stat().st_size > 0
