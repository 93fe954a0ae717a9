"""The eval harness end to end on a tiny bring-your-own model: scoring, resets, plug-in methods, report, CLI."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from typer.testing import CliRunner

from adapters import registry
from adapters.base import Adapter, MethodConfig, StepInfo, StepResult, StreamState
from adapters.norms import NormKind
from tta_server.cli import app
from tta_server.evaluation.harness import EvalError, EvalSpec, Tally, run_eval, subset
from tta_server.evaluation.report import Row, build_report, group_rows, load_results, table, used_cell
from tta_server.evaluation.results import EvalResult, Work, read_result, run_markdown, write_result
from tta_server.shift.corruptions import Domain
from tta_server.shift.streams import Setting
from tta_server.zoo.resnet_cifar import cifar_resnet

runner = CliRunner()


@pytest.fixture
def tiny_model(tmp_path: Path) -> Path:
    """A randomly initialized 4-class ResNet-20 as a bring-your-own catalogue entry."""
    torch.manual_seed(0)
    save_file(cifar_resnet(20, NormKind.BN, 4).state_dict(), tmp_path / "tiny.safetensors")
    config = tmp_path / "models.json"
    entry = {
        "name": "tiny",
        "arch": "cifar_resnet20",
        "weights": "tiny.safetensors",
        "classes": ["a", "b", "c", "d"],
        "mean": [0.5, 0.5, 0.5],
        "std": [0.25, 0.25, 0.25],
    }
    config.write_text(json.dumps({"models": [entry]}))
    return config


def spec(tmp_path: Path, tiny_npz: Path, tiny_model: Path, **changes: Any) -> EvalSpec:
    base: dict[str, Any] = {
        "model": "tiny",
        "method": "source",
        "data": tiny_npz,
        "models_dir": tmp_path / "no-third-party-models",
        "model_config_file": tiny_model,
        "cache_dir": tmp_path / "cache",
        "corruptions": ("gaussian_noise", "contrast"),
        "batch_size": 16,
        "threads": 1,
    }
    base.update(changes)
    return EvalSpec(**base)


class RecorderConfig(MethodConfig):
    """No options."""


class Recorder(Adapter[RecorderConfig]):
    """A method defined outside the harness: counts steps in its state and logs resets."""

    name = "test-recorder"
    config_cls = RecorderConfig
    supported_norms = frozenset(NormKind)
    predicts = "no_update"
    batch_size_one = "same"
    events: ClassVar[list[str]] = []
    teacher: nn.Module | None = None

    def init_state(self, model: nn.Module, seed: int = 0, model_hash: str = "") -> StreamState:
        self.events.append("init")
        return StreamState({"steps": torch.zeros(())}, self.new_meta(seed, model_hash))

    def step(self, model: nn.Module, x: torch.Tensor, state: StreamState, adapt: bool = True) -> StepResult:
        with torch.no_grad():
            logits = model(x)
        tensors = {"steps": state.tensors["steps"] + 1}
        used = len(x) // 2
        info = StepInfo(True, len(x), used, forwards=2, backwards=1, samples_filtered=len(x) - used)
        return StepResult(logits, StreamState(tensors, state.meta), info)

    def reset(self, model: nn.Module, state: StreamState) -> StreamState:
        self.events.append(f"reset after {int(state.tensors['steps'])}")
        return super().reset(model, state)


class WithTeacher(Recorder):
    """Names an auxiliary model by catalogue name, as CEMA names its teacher."""

    name = "test-teacher"

    def auxiliary_models(self) -> dict[str, str]:
        return {"teacher": "tiny"}

    def bind_auxiliary(self, models: Mapping[str, nn.Module]) -> None:
        super().bind_auxiliary(models)
        self.teacher = models["teacher"]
        self.events.append("bound")

    def step(self, model: nn.Module, x: torch.Tensor, state: StreamState, adapt: bool = True) -> StepResult:
        if self.teacher is None or self.teacher is model:
            raise RuntimeError("teacher not bound, or bound to the student itself")
        return super().step(model, x, state, adapt)


def test_source_run_scores_and_records_everything(tmp_path: Path, tiny_npz: Path, tiny_model: Path) -> None:
    result = run_eval(spec(tmp_path, tiny_npz, tiny_model, command="tta-server eval ..."))
    assert [d.corruption for d in result.domains] == ["gaussian_noise", "contrast"]
    assert all(d.n == 64 and d.error == pytest.approx(100 - d.accuracy) for d in result.domains)
    assert result.mean_error == pytest.approx(np.mean([d.error for d in result.domains]), abs=1e-3)
    assert (result.n_images, result.n_batches, result.resets) == (128, 8, 1)  # iid: reset before contrast
    assert result.model.sha256 and result.versions["torch"] == torch.__version__ and result.threads == 1
    assert result.curve.positions[-1] == 128 and result.curve.domain[-1] == "contrast-5"
    assert result.dataset.n == 64 and result.dataset.classes == 4
    assert result.work is not None and (result.work.steps, result.work.adapted_steps) == (8, 0)
    assert (result.work.samples, result.work.samples_used, result.work.forwards) == (128, 0, 8)
    json_path, md_path = write_result(result, tmp_path / "out")
    assert read_result(json_path) == result
    assert "| gaussian_noise |" in md_path.read_text() and "**mean**" in md_path.read_text()
    assert run_eval(spec(tmp_path, tiny_npz, tiny_model)).domains == result.domains  # deterministic, cached


def test_new_methods_plug_in_through_the_registry(
    tmp_path: Path, tiny_npz: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(registry._REGISTRY, Recorder.name, Recorder)
    monkeypatch.setitem(registry._REGISTRY, WithTeacher.name, WithTeacher)
    Recorder.events.clear()
    result = run_eval(spec(tmp_path, tiny_npz, tiny_model, method="test-recorder", setting=Setting.IID))
    assert Recorder.events == ["init", "reset after 4", "init"] and result.resets == 1  # base reset re-inits
    work = result.work
    assert work is not None and (work.steps, work.adapted_steps, work.samples) == (8, 8, 128)
    assert (work.samples_used, work.samples_filtered, work.forwards, work.backwards) == (64, 64, 16, 8)
    assert work.used_ratio == pytest.approx(0.5)
    assert "64 of 128 samples used by updates (50.0%)" in run_markdown(result)
    Recorder.events.clear()
    run_eval(spec(tmp_path, tiny_npz, tiny_model, method="test-recorder", setting=Setting.CONTINUAL))
    assert Recorder.events == ["init"]
    Recorder.events.clear()
    result = run_eval(spec(tmp_path, tiny_npz, tiny_model, method="test-teacher", batch_size=1, limit=10))
    assert Recorder.events[:2] == ["bound", "init"] and result.n_batches == 20
    assert result.auxiliary_models["teacher"].name == "tiny"


def test_clean_data_and_argument_errors(tmp_path: Path, tiny_npz: Path, tiny_model: Path) -> None:
    clean = run_eval(spec(tmp_path, tiny_npz, tiny_model, corruptions=("none",), setting=Setting.MIXED))
    assert [d.corruption for d in clean.domains] == ["none"] and clean.severity == 0
    assert spec(tmp_path, tiny_npz, tiny_model, severity=0).domains() == [Domain.clean()]
    assert len(spec(tmp_path, tiny_npz, tiny_model, corruptions=()).domains()) == 15
    with pytest.raises(EvalError, match="unknown corruption"):
        spec(tmp_path, tiny_npz, tiny_model, corruptions=("rain",)).domains()
    with pytest.raises(EvalError, match="cannot be combined"):
        spec(tmp_path, tiny_npz, tiny_model, corruptions=("none", "fog")).domains()


def test_stream_seed_fixes_the_data_while_the_method_seed_varies(
    tmp_path: Path, tiny_npz: Path, tiny_model: Path
) -> None:
    runs = [
        run_eval(spec(tmp_path, tiny_npz, tiny_model, method="unmix_tns", limit=40, seed=s, stream_seed=7))
        for s in (0, 1)
    ]
    assert runs[0].dataset.fingerprint == runs[1].dataset.fingerprint  # the same 40 images
    assert [r.stem().endswith(f"_seed{s}_stream7") for r, s in zip(runs, (0, 1), strict=True)] == [True, True]
    other_data = run_eval(spec(tmp_path, tiny_npz, tiny_model, method="unmix_tns", limit=40, seed=0))
    assert other_data.dataset.fingerprint != runs[0].dataset.fingerprint and other_data.stream_seed is None
    row = next(iter(group_rows(runs).values()))[0]
    assert row.seeds == "0,1 (stream 7)" and row.mean_spread is not None


def test_tally_curve_and_subset() -> None:
    tally = Tally(2)
    for i in range(10):
        tally.add(np.array([True, i % 2 == 0]), np.array([i // 5, i // 5]))
    curve = tally.curve([Domain("fog", 1), Domain("snow", 1)], points=5)
    assert curve.positions == [4, 8, 12, 16, 20] and curve.domain[-1] == "snow-1"
    assert curve.cumulative[-1] == 75.0 and tally.seen.tolist() == [10, 10]
    from tta_server.data.datasets import LabeledImages

    data = LabeledImages(np.zeros((20, 8, 8, 3), np.uint8), np.arange(20) % 2, ("x", "y"))
    picked = subset(data, 5, seed=1)
    assert len(picked) == 5 and subset(data, 5, seed=1).y.tolist() == picked.y.tolist()
    assert subset(data, None, 0) is data


def fake_result(method: str, setting: str, batch: int, errors: dict[str, float], seed: int = 0) -> EvalResult:
    domains = [
        {"corruption": c, "severity": 5, "n": 100, "correct": int(100 - e), "accuracy": 100 - e, "error": e}
        for c, e in errors.items()
    ]
    raw = {
        "schema": "tta-server.eval/1",
        "model": {"name": "resnet20", "arch": "cifar_resnet20", "sha256": "ab" * 32},
        "method": method,
        "method_config": {},
        "config_overrides": {},
        "auxiliary_models": {},
        "predicts": "no_update",
        "setting": setting,
        "batch_size": batch,
        "severity": 5,
        "dirichlet_delta": None,
        "seed": seed,
        "limit": None,
        "dataset": {
            "path": "data/test",
            "fingerprint": "f" * 16,
            "n_source": 100,
            "n": 100,
            "image_size": [32, 32],
            "classes": 10,
        },
        "domains": domains,
        "mean_error": float(np.mean(list(errors.values()))),
        "mean_accuracy": 100 - float(np.mean(list(errors.values()))),
        "n_images": 100 * len(errors),
        "n_batches": 10,
        "resets": 0,
        "timing": {"wall_s": 1.0, "data_s": 0.1, "adapt_s": 0.5, "images_per_s": 400.0},
        "curve": {"positions": [50, 100], "cumulative": [60.0, 65.0], "window": [60.0, 70.0], "domain": ["a", "b"]},
        "device": "cpu",
        "threads": 2,
        "versions": {"torch": "2"},
        "machine": {"processor": "x86_64", "cpu_count": "2"},
        "started_at": "2026-01-01T00:00:00+0000",
        "command": f"tta-server eval --method {method}",
    }
    return EvalResult.model_validate(raw)


def test_report_tables_and_plots(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    write_result(fake_result("bn", "iid", 64, {"fog": 20.0, "contrast": 10.0}), runs)
    write_result(fake_result("source", "iid", 64, {"fog": 40.0, "contrast": 60.0}), runs)
    write_result(fake_result("source", "iid", 64, {"fog": 42.0, "contrast": 62.0}, seed=1), runs)
    write_result(fake_result("source", "continual", 1, {"fog": 40.0, "contrast": 60.0}), runs)
    (runs / "other.json").write_text('{"not": "a result"}')
    results = load_results([runs])
    assert len(results) == 4
    rows = next(iter(group_rows(results).values()))
    assert [(r.method, r.setting, r.batch_size) for r in rows] == [
        ("source", "iid", 64),
        ("bn", "iid", 64),
        ("source", "continual", 1),
    ]
    out = tmp_path / "docs" / "results.md"
    markdown = build_report(results, out, tmp_path / "docs" / "plots")
    # mean over seeds 0 and 1 (50 and 52), with the sample sd of the two means
    assert "| source | iid | 64 | 41.0 | 61.0 | **51.0** ± 1.4 | 0,1 |" in markdown
    assert "| fog | contr |" in markdown.replace("| method | setting | batch ", "")
    pngs = sorted(p.name for p in (tmp_path / "docs" / "plots").glob("*.png"))
    assert len(pngs) == 4 and all(p.startswith("resnet20-data-test-sev5-") for p in pngs)
    assert "](plots/resnet20-data-test-sev5-iid-bs64-errors.png)" in markdown
    assert "## resnet20 on data/test, severity 5" in markdown


def test_report_shows_the_share_of_samples_updates_used() -> None:
    old = fake_result("cema", "iid", 64, {"fog": 20.0})
    work = Work(steps=4, adapted_steps=4, samples=256, samples_used=64, samples_filtered=192, forwards=8, backwards=4)
    new = old.model_copy(update={"work": work})
    assert used_cell([old]) == "-" and used_cell([new]) == "25.0" and used_cell([new, old]) == "25.0"
    assert EvalResult.model_validate_json(new.to_json()).work == work
    assert "| 25.0 |" in table([Row("cema", "iid", 64, (new,))])


def test_cli_eval_then_report(tmp_path: Path, tiny_npz: Path, tiny_model: Path) -> None:
    out = tmp_path / "runs"
    args = ["eval", "--model", "tiny", "--method", "source", "--corruptions", "contrast,fog", "--severity", "2"]
    args += ["--data", str(tiny_npz), "--models-dir", str(tmp_path), "--model-config", str(tiny_model)]
    args += ["--out", str(out), "--cache-dir", str(tmp_path / "cache"), "--batch-size", "32", "--threads", "1"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert len(list(out.glob("*.json"))) == 1 and len(list(out.glob("*.md"))) == 1
    report = runner.invoke(app, ["report", str(out), "--out", str(tmp_path / "results.md")])
    assert report.exit_code == 0, report.output
    assert "| source | iid | 32 |" in (tmp_path / "results.md").read_text()
    bad = runner.invoke(app, [*args[:6], "rain", *args[7:]])
    assert bad.exit_code == 2 and "unknown corruption" in bad.output
    bad_config = runner.invoke(app, [*args, "--config", '{"lr": 1}'])
    assert bad_config.exit_code == 2 and "invalid config" in bad_config.output
    empty = runner.invoke(app, ["report", str(tmp_path / "cache")])
    assert empty.exit_code == 2


def test_a_run_keeps_its_config_in_its_label_after_a_default_changes() -> None:
    """A record's config that differs from the method's current default shows in its row label, even when
    it was the default (no override) at the time: rows never mix two configs under one name."""
    from adapters.unmix_tns import UnMixTNSConfig

    run = fake_result("unmix_tns", "iid", 64, {"fog": 40.0})
    default = UnMixTNSConfig().init
    other = next(v for v in ("random", "source", "source_spread") if v != default)
    today = run.model_copy(update={"method_config": {"init": default, "temperature": 0.07}})
    assert today.method_label == "unmix_tns"
    then = run.model_copy(update={"method_config": {"init": other, "temperature": 0.07}})
    assert then.method_label == f"unmix_tns(init={other})"
    spelled_out = today.model_copy(update={"config_overrides": {"init": default}})
    assert spelled_out.method_label == "unmix_tns"  # an override equal to today's default is none
    unknown = run.model_copy(update={"method": "not-registered", "config_overrides": {"a": 1}})
    assert unknown.method_label == "not-registered(a=1)"


def test_records_older_than_a_config_field_are_labelled_with_what_they_ran() -> None:
    """UnMix-TNS records written before `init` existed ran the official random draw."""
    run = fake_result("unmix_tns", "iid", 64, {"fog": 40.0})
    old = run.model_copy(update={"method_config": {"num_components": 16, "temperature": 0.07}})
    assert old.method_label == "unmix_tns(init=random)"
