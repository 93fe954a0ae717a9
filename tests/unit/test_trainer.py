from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tta_server.training.trainer import TrainConfig, lr_at, train


def _config(tiny_npz: Path) -> TrainConfig:
    return TrainConfig(
        depth=20,
        norm="gn",
        epochs=2,
        batch_size=16,
        precision="fp32",
        train_data=str(tiny_npz),
        test_data=str(tiny_npz),
        warmup_epochs=0.5,
    )


def test_resume_continues_exactly(tiny_npz: Path, tmp_path: Path) -> None:
    config = _config(tiny_npz)
    straight = train(config, tmp_path / "a", tmp_path / "out-a")
    assert straight is not None
    assert train(config, tmp_path / "b", tmp_path / "out-b", max_steps=3) is None
    resumed = train(config, tmp_path / "b", tmp_path / "out-b", resume=True)
    assert resumed is not None
    a, b = load_file(str(straight)), load_file(str(resumed))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    card = json.loads((tmp_path / "out-a" / "resnet20-gn.json").read_text())
    assert card["norm"] == "gn" and card["epochs"] == 2 and 0.0 <= card["clean_top1"] <= 1.0
    assert (tmp_path / "out-a" / "resnet20-gn.md").read_text().startswith("# resnet20-gn")


def test_resume_refuses_another_config(tiny_npz: Path, tmp_path: Path) -> None:
    config = _config(tiny_npz)
    train(config, tmp_path / "run", tmp_path / "out", max_steps=1)
    with pytest.raises(ValueError, match="different configuration"):
        train(config.model_copy(update={"seed": 7}), tmp_path / "run", tmp_path / "out", resume=True)


def test_lr_schedule_warms_up_then_decays_to_zero() -> None:
    config = TrainConfig(epochs=10, lr=0.1, warmup_epochs=1)
    lrs = [lr_at(config, s, 100) for s in range(1000)]
    assert lrs[0] == pytest.approx(0.001) and lrs[99] == pytest.approx(0.1)
    assert max(lrs) == pytest.approx(0.1) and lrs[-1] < 1e-5
    assert all(a >= b for a, b in itertools.pairwise(lrs[100:]))
