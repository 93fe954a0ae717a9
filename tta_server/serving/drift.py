"""Per-stream drift signals over recent windows, kept in this process.

Per batch the runner records: prediction entropy and confidence, the predicted-class
histogram, how many samples a method's filter excluded, resets, and on every
``sample_every``-th batch the source model's view of the same images (disagreement between
source and adapted predictions, and for BN models the shift of the batch statistics from the
source statistics). Windows are the last ``short`` and ``long`` batches plus lifetime totals.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from tta_server.state.base import StreamKey


class BatchSignals(NamedTuple):
    """What one batch contributes to a stream's drift windows."""

    n: int
    entropy_sum: float
    confidence_sum: float
    class_counts: np.ndarray
    filtered: int
    used: int
    resets: int
    sampled: int = 0
    disagreed: int = 0
    bn_shift: float | None = None
    regime: str | None = None
    """The regime an ``auto`` stream predicted this batch in (None for other methods)."""


@dataclass
class _StreamDrift:
    batches: deque[BatchSignals]
    lifetime_images: int = 0
    lifetime_resets: int = 0


@dataclass(frozen=True)
class WindowSummary:
    batches: int
    images: int
    entropy_mean: float | None
    confidence_mean: float | None
    class_distribution: list[float]
    class_shift_tv: float | None
    """Total variation distance of the predicted-class distribution from uniform (0 = balanced)."""
    filtered_ratio: float | None
    source_disagreement: float | None
    bn_shift: float | None
    resets: int


@dataclass(frozen=True)
class DriftSummary:
    short: WindowSummary
    long: WindowSummary
    lifetime_images: int
    lifetime_resets: int
    window_batches: dict[str, int] = field(default_factory=dict)
    regime: str | None = None
    """The latest batch's regime of an ``auto`` stream (None for other methods)."""


def summarize(batches: list[BatchSignals], num_classes: int) -> WindowSummary:
    """Aggregate a list of batch signals into one window summary."""
    images = sum(b.n for b in batches)
    counts = np.zeros(num_classes)
    for b in batches:
        counts[: len(b.class_counts)] += b.class_counts
    dist = (counts / images).tolist() if images else [0.0] * num_classes
    decided = sum(b.filtered + b.used for b in batches)
    sampled = sum(b.sampled for b in batches)
    shifts = [b.bn_shift for b in batches if b.bn_shift is not None]
    return WindowSummary(
        batches=len(batches),
        images=images,
        entropy_mean=sum(b.entropy_sum for b in batches) / images if images else None,
        confidence_mean=sum(b.confidence_sum for b in batches) / images if images else None,
        class_distribution=[round(p, 4) for p in dist],
        class_shift_tv=0.5 * sum(abs(p - 1 / num_classes) for p in dist) if images else None,
        filtered_ratio=sum(b.filtered for b in batches) / decided if decided else None,
        source_disagreement=sum(b.disagreed for b in batches) / sampled if sampled else None,
        bn_shift=sum(shifts) / len(shifts) if shifts else None,
        resets=sum(b.resets for b in batches),
    )


class DriftTracker:
    """Thread-safe bounded windows of batch signals per stream."""

    def __init__(self, short: int = 10, long: int = 100, sample_every: int = 10, max_streams: int = 10_000) -> None:
        self.short = short
        self.long = long
        self.sample_every = sample_every
        self.max_streams = max_streams
        self._streams: dict[StreamKey, _StreamDrift] = {}
        self._lock = threading.Lock()

    def should_sample(self, step: int) -> bool:
        """Whether the batch at ``step`` (1 = first) also runs the source model (disagreement, BN shift)."""
        return self.sample_every > 0 and (step - 1) % self.sample_every == 0

    def record(self, key: StreamKey, signals: BatchSignals) -> None:
        with self._lock:
            entry = self._streams.get(key)
            if entry is None:
                if len(self._streams) >= self.max_streams:
                    self._streams.pop(next(iter(self._streams)))
                entry = self._streams[key] = _StreamDrift(deque(maxlen=self.long))
            entry.batches.append(signals)
            entry.lifetime_images += signals.n
            entry.lifetime_resets += signals.resets

    def forget(self, key: StreamKey) -> None:
        with self._lock:
            self._streams.pop(key, None)

    def summary(self, key: StreamKey, num_classes: int) -> DriftSummary:
        with self._lock:
            entry = self._streams.get(key)
            batches = list(entry.batches) if entry else []
            lifetime = (entry.lifetime_images, entry.lifetime_resets) if entry else (0, 0)
        return DriftSummary(
            short=summarize(batches[-self.short :], num_classes),
            long=summarize(batches, num_classes),
            lifetime_images=lifetime[0],
            lifetime_resets=lifetime[1],
            window_batches={"short": self.short, "long": self.long},
            regime=batches[-1].regime if batches else None,
        )


class ScoredProbs(NamedTuple):
    """Probabilities with their per-row entropy and confidence, computed once per batch on the worker.

    The answer (per-image entropy) and the drift observer (batch means, histograms) read the same
    rows; computing them once for a fused batch instead of once per stream and again per answer
    takes that work off the event loop.
    """

    probs: np.ndarray
    entropy: np.ndarray
    confidence: np.ndarray

    @classmethod
    def of(cls, probs: np.ndarray) -> ScoredProbs:
        entropy, confidence = entropy_and_confidence(probs)
        return cls(probs, entropy, confidence)

    def rows(self, start: int, stop: int) -> ScoredProbs:
        return ScoredProbs(self.probs[start:stop], self.entropy[start:stop], self.confidence[start:stop])


def entropy_and_confidence(probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-row entropy (nats) and max probability of a probability matrix."""
    # softmax output never exceeds 1, so only the floor of a clip matters (np.maximum skips clip's wrapper);
    # the reductions are the ufuncs' own (``ndarray.sum``/``max`` add a Python wrapper around the same call),
    # and the sign is flipped on the row sums, not on every probability (the same numbers: negation is exact)
    entropy = -np.add.reduce(probs * np.log(np.maximum(probs, 1e-12)), axis=1)
    return entropy, np.maximum.reduce(probs, axis=1)


def finite_or_none(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None
