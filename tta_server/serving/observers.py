"""Observers of a finished step: metrics and drift watch what happened, they never decide it.

Why observers: a step's answer and the stream's next state are settled once the state is
written. Metrics and drift bookkeeping come after that; if one of them raised inside the step,
the client got a 500 although the stream had already moved on, which breaks the promise that
a failed request never changes a stream. So each observer runs behind :meth:`Observers.notify_all`,
which logs and counts an observer's exception (``tta_observer_errors_total{observer}``) and
carries on: the answer and the stored state are what they would have been without it.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import numpy as np
import torch
from torch import nn

from adapters.auto import regime_name
from adapters.base import StepInfo
from adapters.norms import norm_kind_of
from tta_server.hot_metrics import CounterSeries, HistogramSeries
from tta_server.metrics import Metrics
from tta_server.serving.drift import BatchSignals, DriftTracker, ScoredProbs
from tta_server.state.base import StreamRecord
from tta_server.zoo.catalogue import LoadedModel

log = logging.getLogger(__name__)


class StepEvent(NamedTuple):
    """What one finished step of one stream did (the observers' only input).

    Like the other records made once per request (jobs, outputs, outcomes, drift signals), a named
    tuple: immutable as a frozen dataclass, without the ``object.__setattr__`` per field that a
    frozen dataclass's ``__init__`` makes.
    """

    record: StreamRecord
    loaded: LoadedModel
    x: torch.Tensor
    scored: ScoredProbs
    info: StepInfo
    step: int
    seconds: float
    adapt: bool
    state_bytes: int

    @property
    def probs(self) -> np.ndarray:
        return self.scored.probs

    @property
    def labels(self) -> tuple[str, str]:
        """The (model, method) metric labels of the stream."""
        return self.record.model, self.record.method


class StepObserver(Protocol):
    """Something that watches finished steps; ``name`` labels its errors.

    An event the observer ``defers`` is observed after the step's answers were handed back (the
    drift observer runs the source model every N batches: that forward pass must not delay the
    request it samples); the others are observed before the answer, so counters include the
    request they answer, and a batch that nobody defers costs no second trip to the worker.
    """

    name: str

    def defers(self, event: StepEvent) -> bool: ...

    def observe(self, event: StepEvent) -> None: ...


class Observers:
    """Runs every observer on an event; an observer's exception is logged and counted, never raised."""

    def __init__(self, observers: Sequence[StepObserver], metrics: Metrics) -> None:
        self.observers = list(observers)
        self.metrics = metrics
        for observer in self.observers:  # every observer's error series exists from the start, at 0
            metrics.observer_errors.labels(observer.name)

    def notify_all(self, events: Sequence[StepEvent], deferred: bool = False) -> bool:
        """Run on each of ``events`` the observers that defer it (``deferred``) or that do not (the default);
        whether an observer was left out of some event (for the default pass: whether a deferred pass is
        needed), so each observer's ``defers`` is asked once."""
        left_out = False
        for event in events:
            for observer in self.observers:
                if observer.defers(event) != deferred:
                    left_out = True
                    continue
                try:
                    observer.observe(event)
                except Exception:
                    log.exception(
                        "observer %s failed on stream %s (the request is unaffected)", observer.name, event.record.key
                    )
                    self.metrics.observer_errors.labels(observer.name).inc()
        return left_out


@dataclass(frozen=True)
class _StepSeries:
    """The per-(model, method) series every step touches."""

    inference: HistogramSeries
    images: CounterSeries
    state_bytes: HistogramSeries
    adaptation_steps: CounterSeries


class MetricsObserver:
    """Per-(model, method) counters and histograms of a step."""

    name = "metrics"

    def defers(self, event: StepEvent) -> bool:
        """Never: counters include the request they answer."""
        return False

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        # looked up once per (model, method): a fused batch observes one event per stream, and
        # ``labels()`` (a lock and a dict lookup per metric) was the larger part of each
        self._series: Callable[[tuple[str, str]], _StepSeries] = functools.cache(self._labelled)

    def _labelled(self, labels: tuple[str, str]) -> _StepSeries:
        """The labelled series of one (model, method)."""
        m = self.metrics
        return _StepSeries(
            m.inference.labels(*labels),
            m.images.labels(*labels),
            m.state_bytes.labels(*labels),
            m.adaptation_steps.labels(*labels),
        )

    def observe(self, event: StepEvent) -> None:
        m, labels, info = self.metrics, event.labels, event.info
        series = self._series(labels)
        series.inference.observe(event.seconds)
        series.images.inc(len(event.probs))
        if event.adapt:
            series.state_bytes.observe(event.state_bytes)
        if info.adapted:
            series.adaptation_steps.inc()
        if info.samples_filtered:
            m.samples_filtered.labels(*labels).inc(info.samples_filtered)
        if info.resets:
            m.resets.labels(*labels, "collapse").inc(info.resets)
        if info.extra.get("switched", 0.0) > 0.5:  # only ``auto`` streams report a switch
            regime = regime_name(info.extra.get("regime"))
            if regime is not None:
                m.auto_switches.labels(*labels, regime).inc()


_DriftSeries = tuple[HistogramSeries, HistogramSeries]
"""The (entropy, confidence) series of one (model, method)."""


class DriftObserver:
    """Drift signals of a step: entropy and confidence always, the source model's view every N batches."""

    name = "drift"

    def defers(self, event: StepEvent) -> bool:
        """Only the batches that run the source model (every ``sample_every``-th step of a stream)."""
        return self.drift.should_sample(event.step)

    def __init__(self, drift: DriftTracker, metrics: Metrics) -> None:
        self.drift = drift
        self.metrics = metrics
        # looked up once per (model, method), as MetricsObserver's
        self._series: Callable[[tuple[str, str]], _DriftSeries] = functools.cache(self._labelled)

    def _labelled(self, labels: tuple[str, str]) -> _DriftSeries:
        """The (entropy, confidence) series of one (model, method)."""
        return self.metrics.entropy.labels(*labels), self.metrics.confidence.labels(*labels)

    def observe(self, event: StepEvent) -> None:
        probs, labels, info = event.probs, event.labels, event.info
        n = len(probs)
        # summed as Python floats: numpy's sum on a few values (its Python wrapper, a reduction) costs more
        entropy_sum, confidence_sum = sum(event.scored.entropy.tolist()), sum(event.scored.confidence.tolist())
        entropy, confidence = self._series(labels)
        entropy.observe(entropy_sum / n)
        confidence.observe(confidence_sum / n)
        predicted = probs.argmax(axis=1)
        sampled = disagreed = 0
        bn_shift = None
        if self.drift.should_sample(event.step):
            source_pred, bn_shift = source_view(event.loaded.model, event.x)
            sampled = n
            disagreed = int((source_pred != predicted).sum())
            self.metrics.disagreement.labels(*labels).observe(disagreed / sampled)
            if bn_shift is not None:
                self.metrics.bn_shift.labels(*labels).observe(bn_shift)
        self.drift.record(
            event.record.key,
            BatchSignals(
                n=n,
                entropy_sum=entropy_sum,
                confidence_sum=confidence_sum,
                class_counts=np.bincount(predicted, minlength=probs.shape[1]),
                filtered=info.samples_filtered,
                used=info.samples_used,
                resets=info.resets,
                sampled=sampled,
                disagreed=disagreed,
                bn_shift=bn_shift,
                regime=regime_name(info.extra["regime"]) if "regime" in info.extra else None,
            ),
        )


@torch.no_grad()
def source_view(model: nn.Module, x: torch.Tensor) -> tuple[np.ndarray, float | None]:
    """The source model's predictions and, for BN models, the batch-statistics shift from source.

    The shift is the mean over BN layers and channels of |batch mean - running mean| divided by
    the running std, measured on each BN layer's input during this forward.
    """
    shifts: list[float] = []
    handles = []

    def hook_for(bn: nn.modules.batchnorm._BatchNorm) -> Callable[[nn.Module, tuple[torch.Tensor, ...]], None]:
        def hook(_: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            if bn.running_mean is None or bn.running_var is None:
                return
            batch_mean = inputs[0].float().mean(dim=(0, 2, 3)) if inputs[0].ndim == 4 else inputs[0].mean(0)
            scale = (bn.running_var + bn.eps).sqrt()
            shifts.append(float(((batch_mean - bn.running_mean).abs() / scale).mean()))

        return hook

    for module in model.modules():
        if norm_kind_of(module) is not None and isinstance(module, nn.modules.batchnorm._BatchNorm):
            handles.append(module.register_forward_pre_hook(hook_for(module)))
    try:
        preds = model(x).argmax(dim=1).cpu().numpy()
    finally:
        for h in handles:
            h.remove()
    return preds, (sum(shifts) / len(shifts) if shifts else None)
