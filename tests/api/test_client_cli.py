"""The CLI's building blocks without a server: datasets, label mapping, percentiles, plot, arguments."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from tests.api.helpers import encode, random_images
from tta_client.cli import build_parser, load, main
from tta_client.cli.common import percentile, retry_policy
from tta_client.cli.corruption import MODULE, Corruptions, load_corruptions
from tta_client.cli.datasets import DatasetError, label_map, load_dataset
from tta_client.cli.plot import Curve, plot_replay
from tta_client.errors import QueueFull


def test_npz_and_image_folder_datasets(tiny_npz: Path, tmp_path: Path) -> None:
    data = load_dataset(tiny_npz)
    assert len(data) == 64 and data.pixels is not None and data.class_names is None
    head = data.select(np.arange(10)[::-1])
    assert head.labels.tolist() == (np.arange(10)[::-1] % 4).tolist()
    root = tmp_path / "folder"
    for name in ("dog", "airplane"):
        (root / name).mkdir(parents=True)
        for i in range(3):
            (root / name / f"{i}.png").write_bytes(encode(random_images(1, seed=i)[0]))
    (root / "dog" / "notes.txt").write_text("not an image")
    folder = load_dataset(root)
    assert folder.class_names == ["airplane", "dog"] and folder.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert folder.files is not None and len(folder.batch(0, 4)) == 4
    decoded = folder.decoded()
    assert decoded.pixels is not None and decoded.pixels.shape == (6, 32, 32, 3)


def test_bad_datasets_are_refused_with_reasons(tmp_path: Path) -> None:
    np.savez(tmp_path / "wrong.npz", images=np.zeros((2, 4, 4, 3), np.uint8))
    np.savez(tmp_path / "float.npz", x=np.zeros((2, 4, 4, 3), np.float32), y=np.zeros(2))
    (tmp_path / "empty").mkdir()
    cases = {
        tmp_path / "wrong.npz": "must hold arrays 'x'",
        tmp_path / "float.npz": "uint8",
        tmp_path / "empty": "holds no images",
        tmp_path / "missing.npz": "does not exist",
        Path(__file__): "expected an ImageFolder",
    }
    for path, needle in cases.items():
        with pytest.raises(DatasetError, match=needle):
            load_dataset(path)


def test_labels_map_by_class_name_or_by_index(tiny_npz: Path, tmp_path: Path) -> None:
    classes = ["airplane", "automobile", "bird", "cat"]
    data = load_dataset(tiny_npz)
    assert label_map(data, classes).tolist() == data.labels.tolist()
    with pytest.raises(DatasetError, match="3 classes"):
        label_map(data, classes[:3])
    data.class_names = ["cat", "bird", "airplane", "automobile"]
    assert label_map(data, classes)[:4].tolist() == [3, 2, 0, 1]


def test_percentiles_interpolate_between_ranks() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == pytest.approx(50.5)
    assert percentile(values, 99) == pytest.approx(99.01)
    assert percentile(values, 100) == 100.0 and percentile([7.0], 95) == 7.0
    assert np.isnan(percentile([], 50))


def test_curves_and_plot(tmp_path: Path) -> None:
    curve = Curve("bn", np.array([1, 1, 0, 0, 1, 1], dtype=bool), [2, 4, 6], [0.5, 0.4, 0.3])
    assert curve.cumulative().tolist() == pytest.approx([1, 1, 2 / 3, 0.5, 0.6, 4 / 6])
    assert curve.windowed(2).tolist() == [1, 1, 0.5, 0, 0.5, 1]
    pytest.importorskip("matplotlib")
    path = tmp_path / "plots" / "replay.png"
    plot_replay([curve, Curve("source", ~curve.correct, [2, 4, 6], [0.1, 0.2, 0.3])], 2, "test", path)
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_corruptions_come_from_the_server_package_when_present() -> None:
    found = load_corruptions()
    assert isinstance(found, Corruptions), found  # this checkout has the server package
    found.check("gaussian_noise", 5)
    with pytest.raises(ValueError, match="unknown corruption"):
        found.check("rain", 1)
    with pytest.raises(ValueError, match="severity"):
        found.check("fog", 9)
    noisy = found.corrupt(random_images(2), "gaussian_noise", 3, 0)
    assert noisy.shape == (2, 32, 32, 3) and noisy.dtype == np.uint8


def test_missing_corruptions_are_explained(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(name: str) -> object:
        raise ModuleNotFoundError(f"No module named {name!r}")

    monkeypatch.setattr("importlib.import_module", refuse)
    reason = load_corruptions()
    assert isinstance(reason, str) and MODULE in reason and "install tta-server" in reason


def test_arguments_are_validated_and_bounded(capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser()
    args = parser.parse_args(["load", "--streams", "2", "--config", '{"lr": 0.01}', "--retries", "2"])
    assert args.duration == 10.0 and args.requests == 10_000 and args.config == {"lr": 0.01}
    assert retry_policy(args).max_attempts == 3 and retry_policy(parser.parse_args(["load"])).max_attempts == 1
    for bad in (["load", "--duration", "0"], ["load", "--streams", "0"], ["replay", "x.npz", "--config", "[1]"]):
        with pytest.raises(SystemExit) as info:
            parser.parse_args(bad)
        assert info.value.code == 2
    assert "must" in capsys.readouterr().err


def test_missing_cli_dependencies_are_named(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "rich" else real(name))
    assert main(["load"]) == 2
    assert "pip install 'tta-client[cli]'" in capsys.readouterr().err


def test_too_many_workers_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    status = main(["load", "--streams", "100", "--concurrency", "100", "--url", "http://127.0.0.1:9"])
    assert status == 2 and "exceeds" in capsys.readouterr().err


class QueueFullAtFirst:
    """A stand-in AsyncTTAClient whose first ``full`` predictions answer 429 (Retry-After 0)."""

    def __init__(self, full: int) -> None:
        self.full = full
        self.calls = 0

    def __call__(self, *args: object, **kwargs: object) -> QueueFullAtFirst:
        return self

    async def __aenter__(self) -> QueueFullAtFirst:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    async def create_stream(self, *args: object, stream_id: str, **kwargs: object) -> SimpleNamespace:
        return SimpleNamespace(stream_id=stream_id)

    async def delete_stream(self, stream_id: str) -> None:
        return None

    async def predict(self, stream_id: str, batch: np.ndarray, **kwargs: object) -> SimpleNamespace:
        self.calls += 1
        if self.calls <= self.full:
            raise QueueFull(429, "queue_full", "request queue is full", retry_after=0.0)
        return SimpleNamespace(batch_images=len(batch), predictions=list(range(len(batch))))


LOAD = ["load", "--streams", "2", "--batch-size", "2", "--requests", "6", "--duration", "5", "--json", "-"]


def test_load_waits_out_429_during_warm_up(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    fake = QueueFullAtFirst(full=3)
    monkeypatch.setattr(load, "AsyncTTAClient", fake)
    assert main(LOAD) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] == 6 and report["warmup_errors"] == {} and fake.calls == 3 + 2 + 6


def test_load_prints_the_report_when_warm_up_never_gets_in(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(load, "AsyncTTAClient", QueueFullAtFirst(full=10**6))
    assert main(LOAD) == 1  # nothing succeeded: still a report, and the reason in it
    out = capsys.readouterr()
    report = json.loads(out.out)
    assert report["warmup_errors"] == {"queue_full": 2} and report["errors"] == {"queue_full": 6}
    assert "warm-up errors" in out.err
