"""Test streams: the order in which a benchmark shows corrupted images to an adapting model.

A stream is planned first (pure index arithmetic: which sample of which domain comes when,
and where the adaptation state is reset) and then iterated lazily, loading one domain's
images at a time, so plans are cheap to test and memory stays bounded. Settings:

``iid``
    One corruption at a time, each shuffled, the state reset between corruptions (the Tent
    protocol: every corruption is a separate adaptation run).
``continual``
    The corruptions one after the other in the protocol's order, each shuffled, never reset.
``correlated``
    Label-correlated order within each corruption (Dirichlet, delta 0.1 by default), the
    corruptions in order and never reset, as the mariodoebler/test-time-adaptation
    ``correlated`` setting (the UnMix-TNS non-i.i.d. protocol) runs them.
``mixed``
    All corruptions' samples shuffled together into one stream, never reset.

Batches never straddle two corruptions (except in ``mixed``, where every batch mixes them);
a segment's last batch may be smaller. Every random choice is seeded by the stream seed.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

import numpy as np

from tta_server.shift.domains import Domain

DEFAULT_DIRICHLET_DELTA = 0.1
MIN_SLOT = 10
"""Smallest number of samples a Dirichlet slot must receive (the reference protocol's threshold)."""
MAX_DIRICHLET_TRIES = 10_000


class StreamError(ValueError):
    """A stream that cannot be built: bad batch size, no domains, or an unsatisfiable Dirichlet draw."""


class Setting(StrEnum):
    """How corruptions and samples are ordered, and where adaptation state is reset."""

    IID = "iid"
    CONTINUAL = "continual"
    CORRELATED = "correlated"
    MIXED = "mixed"
    SHIFTING = "shifting"
    """Per corruption, never reset: the first half i.i.d. at the stream's batch size, the second half
    label-correlated (Dirichlet) one image per batch. Why: a stream whose batch size and class
    balance change midway, which no fixed method handles (the case ``auto`` is built for)."""


class ImageSource(Protocol):
    """Gives the images of one domain (``N x H x W x 3`` uint8, possibly memory-mapped)."""

    def images(self, domain: Domain) -> np.ndarray: ...


@dataclass(frozen=True)
class Segment:
    """A run of the stream: sample ``indices[i]`` of domain ``domains[domain_ids[i]]`` at step ``i``.

    ``reset`` says whether the adaptation state goes back to source before the segment.
    """

    domain_ids: np.ndarray
    indices: np.ndarray
    reset: bool
    batch_size: int | None = None
    """Images per batch in this segment (None: the stream's batch size)."""

    def __len__(self) -> int:
        return int(self.indices.shape[0])


@dataclass(frozen=True)
class StreamBatch:
    """One batch as a client would send it, plus what scoring needs.

    ``domain_ids`` index :attr:`CorruptionStream.domains` per sample; ``start`` is the position of the
    first sample in the whole stream; ``reset`` asks the runner to reset the state first.
    """

    x: np.ndarray
    y: np.ndarray
    domain_ids: np.ndarray
    start: int
    reset: bool


def dirichlet_label_order(
    labels: np.ndarray, delta: float, rng: np.random.Generator, min_slot: int = MIN_SLOT
) -> np.ndarray:
    """A permutation of ``range(len(labels))`` in which labels come in long runs.

    There are as many slots as classes, each holding at most ``N / classes`` samples. Each
    class, in turn, is shuffled and split over the slots that still have room in proportions
    drawn from a symmetric Dirichlet(``delta``): small ``delta`` puts most of a class into
    one or two slots. Draws are repeated until every slot holds at least ``min_slot`` samples
    (lowered for tiny datasets). The stream visits the slots in order, and within a slot its
    classes in a random order, each as one contiguous run.
    """
    if delta <= 0:
        raise StreamError(f"Dirichlet delta must be positive, got {delta}")
    n = len(labels)
    classes = np.unique(labels)
    k = len(classes)
    if k <= 1:
        return rng.permutation(n)
    capacity = n / k
    floor = min(min_slot, n // (2 * k))
    members = [np.flatnonzero(labels == c) for c in classes]
    for _ in range(MAX_DIRICHLET_TRIES):
        slots: list[list[np.ndarray]] = [[] for _ in range(k)]
        sizes = np.zeros(k, dtype=np.int64)
        for own in members:
            shuffled = rng.permutation(own)
            open_slots = sizes < capacity
            share = rng.dirichlet(np.full(k, delta)) * open_slots
            share = share / share.sum() if share.sum() > 0 else open_slots / open_slots.sum()
            cuts = (np.cumsum(share) * len(shuffled)).astype(np.int64)[:-1]
            for slot, piece in enumerate(np.split(shuffled, cuts)):
                slots[slot].append(piece)
                sizes[slot] += len(piece)
        if sizes.min() >= floor:
            break
    else:
        raise StreamError(
            f"no Dirichlet(delta={delta}) split of {n} samples in {k} classes gave every slot "
            f"{floor} samples in {MAX_DIRICHLET_TRIES} tries; use a larger delta"
        )
    order = [slots[slot][c] for slot in range(k) for c in rng.permutation(k)]
    return np.concatenate(order)


def plan_segments(
    setting: Setting,
    n_domains: int,
    labels: np.ndarray,
    seed: int,
    delta: float = DEFAULT_DIRICHLET_DELTA,
) -> list[Segment]:
    """The segments of a stream over ``n_domains`` domains that share the same ``labels``."""
    if n_domains < 1:
        raise StreamError("a stream needs at least one domain")
    n = len(labels)
    if n == 0:
        raise StreamError("a stream needs at least one sample")
    if setting is Setting.MIXED:
        rng = np.random.default_rng([seed, n_domains, 7])
        flat = rng.permutation(n * n_domains)
        return [Segment(flat // n, flat % n, reset=True)]
    segments = []
    if setting is Setting.SHIFTING:
        for d in range(n_domains):
            rng = np.random.default_rng([seed, d, 11])
            order = rng.permutation(n)
            half, rest = order[: n // 2], np.sort(order[n // 2 :])
            correlated = rest[dirichlet_label_order(labels[rest], delta, rng)] if len(rest) else rest
            ids = np.full(n, d, dtype=np.int64)
            segments.append(Segment(ids[: len(half)], half, reset=d == 0))
            segments.append(Segment(ids[: len(correlated)], correlated, reset=False, batch_size=1))
        return [s for s in segments if len(s)]
    for d in range(n_domains):
        rng = np.random.default_rng([seed, d])
        order = dirichlet_label_order(labels, delta, rng) if setting is Setting.CORRELATED else rng.permutation(n)
        reset = d == 0 or setting is Setting.IID
        segments.append(Segment(np.full(n, d, dtype=np.int64), order, reset))
    return segments


class CorruptionStream:
    """A planned stream over ``domains`` that yields :class:`StreamBatch` lazily.

    Single-domain segments load their domain's images once when the segment starts (one
    corrupted set in memory at a time); ``mixed`` streams read every batch by index from the
    sources' (memory-mapped) arrays.
    """

    def __init__(
        self,
        setting: Setting,
        domains: Sequence[Domain],
        labels: np.ndarray,
        source: ImageSource,
        batch_size: int,
        seed: int = 0,
        delta: float = DEFAULT_DIRICHLET_DELTA,
    ) -> None:
        if batch_size < 1:
            raise StreamError(f"batch size must be at least 1, got {batch_size}")
        self.setting = Setting(setting)
        self.domains = tuple(domains)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.source = source
        self.batch_size = batch_size
        self.seed = seed
        self.segments = plan_segments(self.setting, len(self.domains), self.labels, seed, delta)

    @property
    def n_samples(self) -> int:
        return sum(len(s) for s in self.segments)

    @property
    def n_batches(self) -> int:
        return sum(-(-len(s) // (s.batch_size or self.batch_size)) for s in self.segments)

    def __len__(self) -> int:
        return self.n_batches

    def __iter__(self) -> Iterator[StreamBatch]:
        start = 0
        for segment in self.segments:
            ids = np.unique(segment.domain_ids)
            arrays = {int(d): self.source.images(self.domains[int(d)]) for d in ids}
            if len(arrays) == 1:
                ((only, images),) = arrays.items()
                arrays = {only: np.array(images)}  # one corrupted set in memory: fast batch gathers
            size = segment.batch_size or self.batch_size
            for offset in range(0, len(segment), size):
                sel = slice(offset, offset + size)
                idx, dom = segment.indices[sel], segment.domain_ids[sel]
                yield StreamBatch(
                    x=self._gather(arrays, dom, idx),
                    y=self.labels[idx],
                    domain_ids=dom,
                    start=start,
                    reset=segment.reset and offset == 0,
                )
                start += len(idx)

    @staticmethod
    def _gather(arrays: dict[int, np.ndarray], dom: np.ndarray, idx: np.ndarray) -> np.ndarray:
        if len(arrays) == 1:
            return np.ascontiguousarray(next(iter(arrays.values()))[idx])
        first = next(iter(arrays.values()))
        out = np.empty((len(idx), *first.shape[1:]), dtype=np.uint8)
        for d in np.unique(dom):
            where = np.flatnonzero(dom == d)
            picks = idx[where]
            order = np.argsort(picks)  # ascending reads are kinder to a memory map
            out[where[order]] = arrays[int(d)][picks[order]]
        return out
