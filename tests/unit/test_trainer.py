from __future__ import annotations

import hashlib
import itertools
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from adapters.norms import NormKind
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


def test_init_weights_are_the_starting_point_and_on_the_card(tiny_npz: Path, tmp_path: Path) -> None:
    first = train(_config(tiny_npz), tmp_path / "a", tmp_path / "out-a")
    assert first is not None
    init = tmp_path / "init.safetensors"
    init.write_bytes(first.read_bytes())
    # A vanishing learning rate and no weight decay: the result must still be the init weights.
    config = _config(tiny_npz).model_copy(update={"init_weights": str(init), "lr": 1e-12, "weight_decay": 0.0})
    second = train(config, tmp_path / "b", tmp_path / "out-b")
    assert second is not None
    a, b = load_file(str(init)), load_file(str(second))
    floats = [k for k in a if a[k].is_floating_point()]
    assert floats and all(torch.allclose(a[k], b[k], atol=1e-6) for k in floats)
    card = json.loads((tmp_path / "out-b" / "resnet20-gn.json").read_text())
    assert card["init_weights"] == str(init)
    assert card["init_sha256"] == hashlib.sha256(init.read_bytes()).hexdigest()
    md = (tmp_path / "out-b" / "resnet20-gn.md").read_text()
    assert f"--init-weights {init}" in md and card["init_sha256"] in md


def test_init_weights_must_exist_and_fit(tiny_npz: Path, tmp_path: Path) -> None:
    missing = _config(tiny_npz).model_copy(update={"init_weights": str(tmp_path / "none.safetensors")})
    with pytest.raises(FileNotFoundError, match=r"init weights .* do not exist"):
        train(missing, tmp_path / "a", tmp_path / "out")
    ln_config = _config(tiny_npz).model_copy(update={"norm": NormKind.LN, "epochs": 1})
    ln = train(ln_config, tmp_path / "ln", tmp_path / "out-ln")
    assert ln is not None
    with pytest.raises(ValueError, match="do not fit this architecture"):
        deeper = _config(tiny_npz).model_copy(update={"init_weights": str(ln), "depth": 32})
        train(deeper, tmp_path / "b", tmp_path / "o")
