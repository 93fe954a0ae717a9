"""The hot-path series expose exactly what prometheus_client's Histogram and Counter expose."""

from __future__ import annotations

import math
import threading

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tta_server.hot_metrics import HotCounter, HotHistogram
from tta_server.metrics import Metrics

Samples = list[tuple[str, tuple[tuple[str, str], ...], float]]


def samples(registry: CollectorRegistry, with_created: bool = False) -> Samples:
    """Every exposed sample, parsed back from the text format (``_created`` times differ by design)."""
    text = generate_latest(registry).decode()
    return sorted(
        (s.name, tuple(sorted(s.labels.items())), s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if with_created or not s.name.endswith("_created")
    )


VALUES = (0.0, 0.05, 0.1, 0.5, 1.0, 1.5, 2.5, 3.0, 1e9, -1.0)


def test_histograms_expose_the_same_samples_as_prometheus_client() -> None:
    theirs, ours = CollectorRegistry(), CollectorRegistry()
    reference = Histogram("x_seconds", "doc", ["model", "method"], buckets=(0.1, 1, 2.5), registry=theirs)
    hot = HotHistogram("x_seconds", "doc", ["model", "method"], buckets=(0.1, 1, 2.5), registry=ours)
    for i, value in enumerate(VALUES):
        labels = ("m", "a" if i % 2 else "b")
        reference.labels(*labels).observe(value)
        hot.labels(*labels).observe(value)
    assert samples(ours) == samples(theirs)
    assert ("x_seconds_bucket", (("le", "1.0"), ("method", "a"), ("model", "m")), 3.0) in samples(ours)


def test_unlabelled_histograms_and_counters_match_too() -> None:
    theirs, ours = CollectorRegistry(), CollectorRegistry()
    reference_h = Histogram("batch_images", "doc", buckets=(1, 2, 4), registry=theirs)
    hot_h = HotHistogram("batch_images", "doc", buckets=(1, 2, 4), registry=ours)
    reference_c = Counter("images_total", "doc", ["model"], registry=theirs)
    hot_c = HotCounter("images_total", "doc", ["model"], registry=ours)
    for n in (1, 1, 3, 4, 64):
        reference_h.observe(n)
        hot_h.observe(n)
        reference_c.labels("r20").inc(n)
        hot_c.labels("r20").inc(n)
    hot_c.labels("other")  # a series exists at 0 once its labels were asked for, as prometheus_client's
    reference_c.labels("other")
    assert samples(ours) == samples(theirs)
    created = [s for s in samples(ours, with_created=True) if s[0].endswith("_created")]
    assert {s[0] for s in created} == {"batch_images_created", "images_created"}
    assert len(created) == 3


def test_nan_is_counted_in_the_inf_bucket() -> None:
    registry = CollectorRegistry()
    hot = HotHistogram("entropy", "doc", buckets=(1.0,), registry=registry)
    hot.observe(math.nan)
    exposed = {(name, labels): value for name, labels, value in samples(registry)}
    assert exposed[("entropy_bucket", (("le", "1.0"),))] == 0
    assert exposed[("entropy_bucket", (("le", "+Inf"),))] == 1
    assert exposed[("entropy_count", ())] == 1


def test_bad_use_is_refused_like_prometheus_client() -> None:
    registry = CollectorRegistry()
    counter = HotCounter("c_total", "doc", ["a"], registry=registry)
    with pytest.raises(ValueError, match="non-negative"):
        counter.labels("x").inc(-1)
    with pytest.raises(ValueError, match="expected 1 label values, got 2"):
        counter.labels("x", "y")
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        HotCounter("c_total", "doc", ["a"], registry=registry)


def test_concurrent_observations_are_all_counted() -> None:
    registry = CollectorRegistry()
    hot = HotHistogram("t", "doc", buckets=(0.5,), registry=registry)
    series = hot.labels()

    def observe() -> None:
        for _ in range(20_000):
            series.observe(0.25)

    threads = [threading.Thread(target=observe) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    exposed = {name: value for name, _, value in samples(registry)}
    assert exposed["t_count"] == 80_000
    assert exposed["t_sum"] == pytest.approx(20_000.0)


def test_the_server_registry_exposes_the_hot_series_with_their_names() -> None:
    metrics = Metrics()
    metrics.record_request("/v1/streams/{stream_id}/predict", "POST", 200, 0.003)
    for histogram in (metrics.batch_images, metrics.batch_requests, metrics.batch_streams):
        histogram.observe(1)
    metrics.inference.labels("resnet20", "bn").observe(0.002)
    metrics.images.labels("resnet20", "bn").inc(3)
    registry = metrics.registry
    route = {"route": "/v1/streams/{stream_id}/predict", "http_method": "POST"}
    assert registry.get_sample_value("tta_http_requests_total", {**route, "status": "200"}) == 1
    assert registry.get_sample_value("tta_http_request_duration_seconds_bucket", {**route, "le": "0.005"}) == 1
    assert registry.get_sample_value("tta_batch_streams_count") == 1
    assert registry.get_sample_value("tta_images_total", {"model": "resnet20", "method": "bn"}) == 3
    assert registry.get_sample_value("tta_inference_duration_seconds_sum", {"model": "resnet20", "method": "bn"}) == (
        pytest.approx(0.002)
    )
