"""The `shifting` setting: per corruption, i.i.d. batches first, then label-correlated single images."""

from __future__ import annotations

import numpy as np

from tta_server.shift.domains import Domain
from tta_server.shift.streams import CorruptionStream, Setting


class Source:
    def images(self, domain: Domain) -> np.ndarray:
        return np.zeros((200, 2, 2, 3), dtype=np.uint8)


def test_batch_size_and_class_balance_change_midway() -> None:
    labels = np.repeat(np.arange(10), 20)
    domains = [Domain("gaussian_noise", 5), Domain("fog", 5)]
    stream = CorruptionStream(Setting.SHIFTING, domains, labels, Source(), batch_size=16, seed=0)
    batches = list(stream)
    assert len(batches) == stream.n_batches and stream.n_samples == 400
    sizes = [len(b.y) for b in batches]
    assert sizes[:6] == [16] * 6 and sizes[6] == 4 and set(sizes[7:107]) == {1}  # 100 iid, then 100 singles
    assert [b.reset for b in batches].count(True) == 1 and batches[0].reset
    for d in (0, 1):
        seen = np.concatenate([b.y for b in batches if b.domain_ids[0] == d])
        assert np.array_equal(np.sort(seen), np.sort(labels))  # every image once per corruption
    second = np.array([b.y[0] for b in batches[7:107]])
    assert (second[1:] != second[:-1]).sum() < 30  # long runs of one class (iid would change ~90 times)
