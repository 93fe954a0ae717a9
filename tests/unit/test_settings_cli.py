from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from tta_server.cli import app
from tta_server.devices import DeviceChoice
from tta_server.settings import Settings

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


# --- serve: one flag per setting, help with defaults and variable names -------------------


def serve_help() -> str:
    result = runner.invoke(app, ["serve", "--help"], env={"COLUMNS": "300", "TERM": "dumb"})
    assert result.exit_code == 0, result.output
    return " ".join(result.output.split())


def test_serve_help_names_every_settings_flag_default_and_variable() -> None:
    from tta_server.cli import ENV_ONLY, FLAG_NAMES

    text = serve_help()
    for name in Settings.model_fields:
        env = f"TTA_{name.upper()}"
        if name in ENV_ONLY:
            assert env not in text, name
            continue
        flag = FLAG_NAMES.get(name, "--" + name.replace("_", "-"))
        assert f"{flag} " in text and f"Env: {env}" in text, name
    for shown in ("Default: 127.0.0.1", "Default: 8000", "Default: memory://", 'Default: ["resnet20"]'):
        assert shown in text, shown
    assert "redis://[user:password@]host:port/db" in text  # brackets survive the rich markup


def test_env_only_settings_are_named_in_the_readme() -> None:
    from tta_server.cli import ENV_ONLY

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    for name in ENV_ONLY:
        assert f"`TTA_{name.upper()}`" in readme and "environment only" in readme, name


def test_serve_flags_reach_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    import uvicorn

    import tta_server.app

    seen: list[Settings] = []

    def fake_create_app(settings: Settings) -> object:
        seen.append(settings)
        return object()

    monkeypatch.setattr(tta_server.app, "create_app", fake_create_app)
    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: None)
    monkeypatch.setenv("TTA_MAX_QUEUE", "9")
    monkeypatch.setenv("TTA_DRIFT_SAMPLE_EVERY", "3")
    args = ["serve", "--max-queue", "7", "--preload-models", '["resnet56"]', "--redis-write-policy", "write-behind"]
    args += ["--log-level", "DEBUG", "--memory-ttl-s", "60", "--store", "redis://localhost:6379/0"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    (s,) = seen
    assert s.max_queue == 7 and s.drift_sample_every == 3  # the flag wins, the variable fills the rest
    assert s.preload_models == ["resnet56"] and s.redis_write_policy.value == "write-behind"
    assert s.log_level == "debug" and s.memory_ttl_s == 60 and s.store_url.startswith("redis://")


def test_serve_rejects_json_flags_that_are_not_json() -> None:
    result = runner.invoke(app, ["serve", "--preload-models", "resnet20,resnet56"])
    assert result.exit_code == 2
    assert "invalid setting preload_models (--preload-models)" in result.output
