"""Stream settings: order, reset points, label correlation, batch size 1, determinism, laziness."""

from __future__ import annotations

import numpy as np
import pytest

from tta_server.shift.corruptions import Domain
from tta_server.shift.streams import (
    CorruptionStream,
    Setting,
    StreamBatch,
    StreamError,
    dirichlet_label_order,
    plan_segments,
)

DOMAINS = [Domain("gaussian_noise", 5), Domain("fog", 5), Domain("contrast", 5)]
N = 200


class FakeSource:
    """Images whose pixels encode (domain index, sample index); records every load."""

    def __init__(self) -> None:
        self.loads: list[str] = []

    def images(self, domain: Domain) -> np.ndarray:
        self.loads.append(domain.name)
        d = [x.name for x in DOMAINS].index(domain.name)
        x = np.zeros((N, 4, 4, 3), dtype=np.uint8)
        x[:, 0, 0, 0] = d
        x[:, 0, 0, 1] = np.arange(N) % 256
        x[:, 0, 0, 2] = np.arange(N) // 256
        return x


def labels(n: int = N, classes: int = 10) -> np.ndarray:
    return np.arange(n) % classes


def label_changes(y: np.ndarray) -> int:
    return int((np.diff(y) != 0).sum())


def collect(setting: Setting, batch_size: int, seed: int = 0) -> tuple[list[StreamBatch], FakeSource]:
    source = FakeSource()
    return list(CorruptionStream(setting, DOMAINS, labels(), source, batch_size, seed)), source


def decode(batch: StreamBatch) -> tuple[np.ndarray, np.ndarray]:
    """(domain ids, sample indices) encoded in the fake images."""
    px = batch.x[:, 0, 0].astype(int)
    return px[:, 0], px[:, 1] + 256 * px[:, 2]


@pytest.mark.parametrize("setting", list(Setting))
def test_every_sample_of_every_domain_once_with_matching_labels(setting: Setting) -> None:
    batches, _ = collect(setting, 64)
    seen = []
    for b in batches:
        dom, idx = decode(b)
        assert np.array_equal(dom, b.domain_ids) and np.array_equal(b.y, labels()[idx])
        seen += list(zip(dom.tolist(), idx.tolist(), strict=True))
    assert sorted(seen) == [(d, i) for d in range(len(DOMAINS)) for i in range(N)]
    assert [b.start for b in batches] == list(np.cumsum([0] + [len(b.y) for b in batches[:-1]]))


def test_reset_points_per_setting() -> None:
    for setting, expected in ((Setting.IID, [0, 4, 8]), (Setting.CONTINUAL, [0]), (Setting.CORRELATED, [0])):
        batches, _ = collect(setting, 64)
        assert [i for i, b in enumerate(batches) if b.reset] == expected, setting
    mixed, _ = collect(Setting.MIXED, 64)
    assert [b.reset for b in mixed] == [True] + [False] * (len(mixed) - 1)


def test_single_domain_settings_follow_protocol_order_and_never_straddle() -> None:
    for setting in (Setting.IID, Setting.CONTINUAL, Setting.CORRELATED):
        batches, source = collect(setting, 64)
        assert source.loads == [d.name for d in DOMAINS]
        order = [int(b.domain_ids[0]) for b in batches]
        assert order == sorted(order) and all(len(set(b.domain_ids.tolist())) == 1 for b in batches)
        assert [len(b.y) for b in batches[:4]] == [64, 64, 64, 8]  # 200 = 3 x 64 + 8, per domain


def test_mixed_interleaves_domains() -> None:
    batches, _ = collect(Setting.MIXED, 30)
    assert sum(len(set(b.domain_ids.tolist())) > 1 for b in batches) > len(batches) // 2


def test_correlated_is_label_correlated_and_iid_is_not() -> None:
    y = np.repeat(np.arange(10), 100)
    rng = np.random.default_rng(0)
    correlated = y[dirichlet_label_order(y, 0.1, rng)]
    shuffled = y[np.random.default_rng(0).permutation(len(y))]
    assert np.array_equal(np.sort(correlated), y)
    assert label_changes(correlated) < label_changes(shuffled) / 10
    assert label_changes(y[dirichlet_label_order(y, 1000.0, np.random.default_rng(0))]) > label_changes(correlated)
    batches, _ = collect(Setting.CORRELATED, 16)
    iid, _ = collect(Setting.IID, 16)
    assert label_changes(np.concatenate([b.y for b in batches])) < label_changes(np.concatenate([b.y for b in iid])) / 3


def test_batch_size_one_and_determinism() -> None:
    ones, _ = collect(Setting.CORRELATED, 1, seed=5)
    assert len(ones) == len(DOMAINS) * N and all(len(b.y) == 1 for b in ones)
    again, _ = collect(Setting.CORRELATED, 1, seed=5)
    assert all(np.array_equal(a.x, b.x) for a, b in zip(ones, again, strict=True))
    other, _ = collect(Setting.CORRELATED, 1, seed=6)
    assert not all(np.array_equal(a.x, b.x) for a, b in zip(ones, other, strict=True))
    assert len(CorruptionStream(Setting.IID, DOMAINS, labels(), FakeSource(), 7)) == 3 * 29


def test_streams_are_lazy() -> None:
    """Nothing is loaded before iteration; the next domain only when its segment starts."""
    source = FakeSource()
    stream = iter(CorruptionStream(Setting.IID, DOMAINS, labels(), source, 64))
    assert source.loads == []
    next(stream)
    assert source.loads == [DOMAINS[0].name]
    for _ in range(3):
        next(stream)
    assert source.loads == [DOMAINS[0].name]
    next(stream)
    assert source.loads == [DOMAINS[0].name, DOMAINS[1].name]


def test_plans_and_errors() -> None:
    segs = plan_segments(Setting.MIXED, 3, labels(), seed=1)
    assert len(segs) == 1 and len(segs[0]) == 3 * N
    with pytest.raises(StreamError, match="batch size"):
        CorruptionStream(Setting.IID, DOMAINS, labels(), FakeSource(), 0)
    with pytest.raises(StreamError, match="at least one domain"):
        plan_segments(Setting.IID, 0, labels(), 0)
    with pytest.raises(StreamError, match="delta"):
        dirichlet_label_order(labels(), 0.0, np.random.default_rng(0))
    tiny = np.array([0, 0, 1, 1, 2])
    assert sorted(dirichlet_label_order(tiny, 0.1, np.random.default_rng(0)).tolist()) == [0, 1, 2, 3, 4]
