"""``tta-client replay`` and ``tta-client load`` against a real server process on 127.0.0.1.

One server (in-memory store, resnet20) serves the whole module. Every run is bounded in
images, requests and seconds, so the module takes seconds, not minutes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.support.processes import free_port
from tta_client import TTAClient
from tta_client.cli import main, replay

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def server_url(shared_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real ``tta-server serve`` subprocess; stopped (terminate, then kill) after the module."""
    port = free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    env = {**os.environ, "TTA_DEVICE": "cpu", "TTA_LOG_LEVEL": "warning", "TTA_PRELOAD_MODELS": '["resnet20"]'}
    command = [str(BIN / "tta-server"), "serve", "--port", str(port), "--models-dir", str(shared_dir / "models")]
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        with TTAClient(url, timeout=5) as api:
            deadline = time.monotonic() + 120
            while process.poll() is None and time.monotonic() < deadline:
                try:
                    if api.ready().ready:
                        break
                except Exception:
                    time.sleep(0.3)
            else:
                pytest.fail(f"server did not become ready: {log.read_text()[-2000:]}")
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


@pytest.fixture(scope="module")
def cifar_npz(shared_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first 96 lossless CIFAR-10 test images, as a small .npz."""
    with np.load(shared_dir / "data" / "cifar10_test_first846.npz") as data:
        x, y = data["x"][:96], data["y"][:96]
    path = tmp_path_factory.mktemp("data") / "cifar96.npz"
    np.savez(path, x=x, y=y)
    return path


def streams_left(url: str) -> int:
    with TTAClient(url) as api:
        return api.list_streams().total


def test_replay_scores_online_accuracy_and_writes_plot_and_json(
    server_url: str, cifar_npz: Path, tmp_path: Path
) -> None:
    plot, report = tmp_path / "replay.png", tmp_path / "replay.json"
    args = [str(cifar_npz), "--url", server_url, "--method", "bn", "--baseline", "source", "--batch-size", "32"]
    status = main(["replay", *args, "--plot", str(plot), "--json", str(report), "--max-seconds", "60"])
    assert status == 0
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 10_000
    result = json.loads(report.read_text())
    runs = {r["method"]: r for r in result["runs"]}
    assert runs["bn"]["images"] == runs["source"]["images"] == 96
    assert runs["source"]["accuracy"] > 0.75  # clean CIFAR-10 through the frozen model
    assert runs["bn"]["accuracy"] > 0.5 and result["domain"] == "clean"
    assert streams_left(server_url) == 0  # the replay's streams are deleted unless --keep


def test_replay_with_a_benchmark_corruption(server_url: str, cifar_npz: Path, tmp_path: Path) -> None:
    report = tmp_path / "noisy.json"
    args = [str(cifar_npz), "--url", server_url, "--method", "source", "--corruption", "gaussian_noise"]
    assert main(["replay", *args, "--severity", "5", "--json", str(report), "--keep", "--stream-id", "noisy"]) == 0
    result = json.loads(report.read_text())
    assert result["domain"] == "gaussian_noise-5" and result["runs"][0]["accuracy"] < 0.6
    with TTAClient(server_url) as api:
        assert api.get_stream("noisy").samples_seen == 96
        api.delete_stream("noisy")


def test_replay_without_corruptions_says_so_and_replays_clean(
    server_url: str,
    cifar_npz: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(replay, "load_corruptions", lambda: "corruptions need the tta-server package")
    report = tmp_path / "r.json"
    args = [str(cifar_npz), "--url", server_url, "--corruption", "fog", "--limit", "32", "--json", str(report)]
    assert main(["replay", *args]) == 0
    assert "--corruption fog skipped: corruptions need the tta-server package" in capsys.readouterr().out
    assert json.loads(report.read_text())["domain"].startswith("clean")


def test_replay_of_an_image_folder_maps_labels_by_class_name(server_url: str, shared_dir: Path, tmp_path: Path) -> None:
    root = tmp_path / "folder"
    for name in ("cat", "ship"):  # folder indices 0, 1; the model's indices 3, 8
        (root / name).mkdir(parents=True)
        for src in sorted((shared_dir / "data" / "cifar10-jpeg" / "test" / name).iterdir())[:12]:
            (root / name / src.name).symlink_to(src)
    report = tmp_path / "folder.json"
    assert main(["replay", str(root), "--url", server_url, "--method", "source", "--json", str(report)]) == 0
    assert json.loads(report.read_text())["runs"][0]["accuracy"] > 0.6


def test_replay_errors_exit_with_a_message(
    server_url: str, cifar_npz: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["replay", str(tmp_path / "missing.npz"), "--url", server_url]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["replay", str(cifar_npz), "--url", server_url, "--model", "nope"]) == 2
    assert "no model 'nope'" in capsys.readouterr().err
    closed = f"http://127.0.0.1:{free_port()}"
    assert main(["replay", str(cifar_npz), "--url", closed, "--retries", "0", "--timeout", "2"]) == 1
    assert "connect_failed" in capsys.readouterr().err


def test_load_reports_throughput_and_latency_percentiles(server_url: str) -> None:
    command = [str(BIN / "tta-client"), "load", "--url", server_url, "--streams", "3", "--batch-size", "4"]
    bounds = ["--duration", "3", "--requests", "24", "--json", "-"]
    out = subprocess.run([*command, *bounds], capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert 0 < report["ok"] <= report["requests"] <= 24 and report["seconds"] < 30
    assert report["images"] == 4 * report["ok"] and report["images_per_s"] > 0
    latency = report["latency_ms"]
    assert 0 < latency["p50"] <= latency["p95"] <= latency["p99"] <= latency["max"]
    assert "latency p99" in out.stderr  # the table goes to stderr when JSON takes stdout
    assert streams_left(server_url) == 0
