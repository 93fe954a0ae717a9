"""Observers (metrics, drift) watch a finished step and can never change it."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, cast

import pytest
import torch
from fastapi.testclient import TestClient

from adapters.serialize import state_from_bytes
from tests.api.helpers import NPY, npy_bytes, random_images
from tta_server.api.deps import Services
from tta_server.app import create_app
from tta_server.metrics import Metrics
from tta_server.serving.drift import DriftTracker
from tta_server.serving.observers import DriftObserver, MetricsObserver, Observers, StepEvent
from tta_server.settings import Settings


def _run(settings: Settings, broken: type[Any] | None, monkeypatch: pytest.MonkeyPatch) -> tuple[list[Any], bytes, str]:
    """Register a tent stream, send three batches; (predict answers, exported state, /metrics).

    The drift observer samples the source model at every step, so it runs its widest path.
    """
    app = create_app(settings.model_copy(update={"drift_sample_every": 1}))
    services: Services = app.state.services
    if broken is not None:
        observer = next(o for o in services.streams.worker.observers.observers if isinstance(o, broken))

        def explode(event: StepEvent) -> None:
            raise RuntimeError(f"observer broke on step {event.step}")

        monkeypatch.setattr(observer, "observe", explode)
    with TestClient(app) as client:
        created = client.post("/v1/streams", json={"model": "resnet20", "method": "tent", "stream_id": "o"})
        assert created.status_code == 201, created.text
        answers = []
        for seed in range(3):
            r = client.post("/v1/streams/o/predict", content=npy_bytes(random_images(4, seed=seed)), headers=NPY)
            assert r.status_code == 200, r.text
            answers.append(r.json())
        state = client.get("/v1/streams/o/state")
        assert state.status_code == 200
        return answers, state.content, client.get("/metrics").text


@pytest.mark.parametrize("broken", [DriftObserver, MetricsObserver])
def test_a_failing_observer_changes_neither_the_answer_nor_the_state(
    settings: Settings, broken: type[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    expected_answers, expected_state, healthy_metrics = _run(settings, None, monkeypatch)
    answers, state, metrics = _run(settings, broken, monkeypatch)
    assert answers == expected_answers
    got, want = state_from_bytes(state), state_from_bytes(expected_state)
    assert got.meta == want.meta
    assert got.tensors.keys() == want.tensors.keys()
    assert all(torch.equal(got.tensors[k], want.tensors[k]) for k in want.tensors)
    assert f'tta_observer_errors_total{{observer="{broken.name}"}} 3.0' in metrics
    for observer in ("drift", "metrics"):
        assert f'tta_observer_errors_total{{observer="{observer}"}} 0.0' in healthy_metrics


def test_only_batches_that_sample_the_source_model_are_deferred() -> None:
    """The drift observer defers (runs after the answer) only the steps where it runs the source model;
    a batch nobody defers gets no deferred pass on the worker."""
    metrics = Metrics()
    observers = Observers([MetricsObserver(metrics), DriftObserver(DriftTracker(sample_every=10), metrics)], metrics)
    at = {step: cast(StepEvent, SimpleNamespace(step=step)) for step in (1, 2, 10, 11)}

    def defers_any(chain: Observers, events: list[StepEvent]) -> bool:
        """What ``Observers.notify_all`` answers for its default pass: whether some observer defers some event."""
        return any(observer.defers(event) for event in events for observer in chain.observers)

    assert [defers_any(observers, [at[s]]) for s in (1, 2, 10, 11)] == [True, False, False, True]
    assert defers_any(observers, [at[2], at[11]])
    off = Observers([DriftObserver(DriftTracker(sample_every=0), metrics)], metrics)
    assert not defers_any(off, list(at.values()))
