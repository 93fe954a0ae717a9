from __future__ import annotations

import hashlib
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from adapters.norms import NormKind
from tta_server.training import trainer
from tta_server.training.trainer import TrainConfig, lr_at, resolve_precision, train


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


def test_swa_schedule_is_constant_in_the_averaging_epochs() -> None:
    config = TrainConfig(epochs=10, lr=0.1, warmup_epochs=1, swa_epochs=3, swa_lr=0.02)
    lrs = [lr_at(config, s, 100) for s in range(1000)]
    assert lrs[99] == pytest.approx(0.1) and lrs[699] < 1e-3
    assert lrs[700:] == [0.02] * 300
    with pytest.raises(ValueError, match=r"swa_epochs \(11\) cannot exceed epochs \(10\)"):
        TrainConfig(epochs=10, swa_epochs=11)


def test_swa_exports_the_average_of_the_epoch_end_weights(tiny_npz: Path, tmp_path: Path) -> None:
    config = _config(tiny_npz).model_copy(update={"swa_epochs": 2, "swa_lr": 0.05})
    steps_per_epoch = len(np.load(tiny_npz)["y"]) // config.batch_size
    run = tmp_path / "run"
    assert train(config, run, tmp_path / "out", max_steps=steps_per_epoch) is None
    first = load_file(str(run / "checkpoint.safetensors"))
    weights = train(config, run, tmp_path / "out", resume=True)  # the average survives the resume
    assert weights is not None
    last = load_file(str(run / "checkpoint.safetensors"))
    out = load_file(str(weights))
    for k, v in out.items():
        expected = (first[f"model.{k}"] + last[f"model.{k}"]) / 2
        assert torch.allclose(v, expected, atol=1e-6), k
    card = (tmp_path / "out" / "resnet20-gn.md").read_text()
    assert "--swa-epochs 2 --swa-lr 0.05" in card
    assert "constant lr 0.05 for all 2 epochs, their end-of-epoch weights averaged" in card


def test_swa_re_estimates_batchnorm_statistics(tiny_npz: Path, tmp_path: Path) -> None:
    config = _config(tiny_npz).model_copy(update={"norm": NormKind.BN, "epochs": 1, "swa_epochs": 1})
    weights = train(config, tmp_path / "run", tmp_path / "out")
    assert weights is not None
    state = load_file(str(weights))
    variances = [v for k, v in state.items() if k.endswith("running_var")]
    # A freshly built BN layer holds ones; the statistics pass must have replaced them.
    assert variances and not any(torch.equal(v, torch.ones_like(v)) for v in variances)


def test_resumed_card_names_the_init_weights_the_run_started_from(tiny_npz: Path, tmp_path: Path) -> None:
    first = train(_config(tiny_npz), tmp_path / "a", tmp_path / "out-a")
    assert first is not None
    init = tmp_path / "init.safetensors"
    init.write_bytes(first.read_bytes())
    started_from = hashlib.sha256(init.read_bytes()).hexdigest()
    config = _config(tiny_npz).model_copy(update={"init_weights": str(init)})
    assert train(config, tmp_path / "run", tmp_path / "out", max_steps=2) is None
    # The init file is replaced while the run is interrupted (a newer model under the same name).
    state = load_file(str(first))
    save_file({k: v + 1 if v.is_floating_point() else v for k, v in state.items()}, str(init))
    assert train(config, tmp_path / "run", tmp_path / "out", resume=True) is not None
    card = json.loads((tmp_path / "out" / "resnet20-gn.json").read_text())
    assert card["init_sha256"] == started_from != hashlib.sha256(init.read_bytes()).hexdigest()


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_uses_bf16_only_where_it_is_fast(native: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(trainer, "cpu_has_native_bf16", lambda: native)
    assert resolve_precision("auto", "cpu") == ("bf16" if native else "fp32")
    assert resolve_precision("auto", "cuda:0") == "bf16"
    assert resolve_precision("fp32", "cuda") == "fp32" and resolve_precision("bf16", "cpu") == "bf16"
