from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from tta_server.cli import app
from tta_server.settings import DeviceChoice, Settings

runner = CliRunner()


def test_settings_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TTA_PORT", "9001")
    monkeypatch.setenv("TTA_DEVICE", "cpu")
    monkeypatch.setenv("TTA_LOG_LEVEL", "DEBUG")
    s = Settings()
    assert (s.port, s.device, s.log_level) == (9001, DeviceChoice.CPU, "debug")
    assert s.store_url == "memory://"


def test_invalid_settings_are_rejected() -> None:
    with pytest.raises(ValidationError, match="port"):
        Settings(port=0)
    with pytest.raises(ValidationError, match="unsupported state store URL"):
        Settings(store_url="ftp://x")


def test_serve_exits_2_naming_the_bad_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TTA_PORT", "70000")
    result = runner.invoke(app, ["serve"])
    assert result.exit_code == 2
    assert "invalid setting port (env TTA_PORT)" in result.output


def test_serve_rejects_bad_device_flag() -> None:
    result = runner.invoke(app, ["serve", "--device", "tpu"])
    assert result.exit_code == 2
    assert "device" in result.output


def test_models_command_prints_catalogue(shared_dir: Path) -> None:
    result = runner.invoke(app, ["models", "--models-dir", str(shared_dir / "models")], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "resnet20" in result.output and "resnet56" in result.output and "81.03%" in result.output


def test_models_command_reports_bad_config(tmp_path: Path, shared_dir: Path) -> None:
    result = runner.invoke(app, ["models", "--model-config", str(tmp_path / "none.json")])
    assert result.exit_code == 2
    assert "model config file not found" in result.output


def test_train_command_runs_and_resumes(tiny_npz: Path, tmp_path: Path) -> None:
    args = ["train", "--norm", "ln", "--epochs", "1", "--batch-size", "32", "--precision", "fp32"]
    args += ["--train-data", str(tiny_npz), "--test-data", str(tiny_npz), "--run-dir", str(tmp_path / "run")]
    args += ["--out", str(tmp_path / "out")]
    first = runner.invoke(app, [*args, "--max-steps", "1"])
    assert first.exit_code == 0, first.output
    assert "continue with --resume" in first.output
    second = runner.invoke(app, [*args, "--resume"])
    assert second.exit_code == 0, second.output
    assert (tmp_path / "out" / "resnet20-ln.safetensors").is_file()


def test_train_command_rejects_missing_init_weights(tiny_npz: Path, tmp_path: Path) -> None:
    args = ["train", "--norm", "gn", "--epochs", "1", "--train-data", str(tiny_npz), "--test-data", str(tiny_npz)]
    result = runner.invoke(app, [*args, "--init-weights", str(tmp_path / "none.safetensors"), "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert "--init-weights" in result.output and "does not exist" in result.output


def test_train_command_rejects_invalid_options(tiny_npz: Path, tmp_path: Path) -> None:
    args = ["train", "--norm", "gn", "--epochs", "2", "--swa-epochs", "3", "--train-data", str(tiny_npz)]
    result = runner.invoke(app, [*args, "--run-dir", str(tmp_path / "run"), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "swa_epochs (3) cannot exceed epochs (2)" in result.output
    assert not (tmp_path / "run").exists() and not (tmp_path / "out").exists()
