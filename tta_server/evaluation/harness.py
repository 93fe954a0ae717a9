"""Run one adaptation method over one corruption stream, in process, and score it.

The harness knows nothing about individual methods: it asks the adapter registry for the
method by name and sets it up with the server's own function
(:func:`~tta_server.serving.method_setup.setup_method`: auxiliary models resolved in the
catalogue and bound, the model checked and prepared), turns images into model inputs with the
server's :func:`~tta_server.serving.method_setup.model_inputs`, and drives the adapter contract
as the server does: ``init_state`` once, ``step`` per batch with the returned state carried
forward, ``reset`` where the stream setting says so. A new method registered in ``adapters`` is
therefore benchmarked with no change here, and a stream replayed here sees what the server sees.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from adapters.base import StepInfo, StreamState
from tta_server.data.datasets import LabeledImages, load_labeled_images
from tta_server.evaluation.environment import machine_info, package_versions
from tta_server.evaluation.results import (
    Curve,
    DatasetInfo,
    DomainScore,
    EvalResult,
    ModelInfo,
    Timing,
    Work,
)
from tta_server.serving.method_setup import MethodSetup, model_inputs, setup_method
from tta_server.shift.cache import CorruptedSets, dataset_fingerprint
from tta_server.shift.domains import CLEAN, CORRUPTIONS, Domain
from tta_server.shift.streams import DEFAULT_DIRICHLET_DELTA, CorruptionStream, Setting
from tta_server.zoo.catalogue import build_catalogue

logger = logging.getLogger(__name__)

CURVE_POINTS = 200


class EvalError(ValueError):
    """An evaluation that cannot run as asked (the message says which argument to change)."""


class Progress(Protocol):
    """Where the runner reports progress (a rich bar in a terminal, log lines otherwise)."""

    def start(self, total_images: int, description: str) -> None: ...

    def advance(self, images: int, description: str) -> None: ...

    def note(self, message: str) -> None: ...


class SilentProgress:
    """Reports nothing (library use and tests)."""

    def start(self, total_images: int, description: str) -> None:
        del total_images, description

    def advance(self, images: int, description: str) -> None:
        del images, description

    def note(self, message: str) -> None:
        del message


@dataclass(frozen=True)
class EvalSpec:
    """What to run. ``corruptions`` empty means all 15; ``severity`` 0 or ``("none",)`` means clean."""

    model: str
    method: str
    data: Path
    models_dir: Path
    setting: Setting = Setting.IID
    batch_size: int = 64
    severity: int = 5
    corruptions: tuple[str, ...] = ()
    method_config: Mapping[str, Any] = field(default_factory=dict)
    limit: int | None = None
    seed: int = 0
    stream_seed: int | None = None
    """Seeds the data (subset, corruption noise, order) when set; ``seed`` then seeds the method only,
    so a method's own randomness can be measured on one fixed stream."""
    dirichlet_delta: float = DEFAULT_DIRICHLET_DELTA
    model_config_file: Path | None = None
    cache_dir: Path | None = None
    persistent_cache: bool = True
    device: str = "cpu"
    threads: int | None = None
    command: str = ""

    def domains(self) -> list[Domain]:
        """The domains in stream order; raises :class:`EvalError` for unknown names."""
        names = [c for c in self.corruptions if c]
        if self.severity == 0 or names == [CLEAN]:
            return [Domain.clean()]
        if CLEAN in names:
            raise EvalError(f"'{CLEAN}' (clean images) cannot be combined with corruptions")
        if not 0 <= self.severity <= 5:
            raise EvalError(f"--severity must be 0 (clean) to 5, got {self.severity}")
        unknown = sorted(set(names) - set(CORRUPTIONS))
        if unknown:
            raise EvalError(f"unknown corruption(s) {unknown}; choose from {', '.join(CORRUPTIONS)} or '{CLEAN}'")
        chosen = [c for c in CORRUPTIONS if c in names] if names else list(CORRUPTIONS)
        return [Domain(c, self.severity) for c in chosen]


@dataclass
class Tally:
    """Running counts along the stream: per domain, and cumulative after every batch."""

    n_domains: int
    seen: np.ndarray = field(init=False)
    correct: np.ndarray = field(init=False)
    ends: list[int] = field(default_factory=list)
    cum_correct: list[int] = field(default_factory=list)
    last_domain: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.seen = np.zeros(self.n_domains, dtype=np.int64)
        self.correct = np.zeros(self.n_domains, dtype=np.int64)

    def add(self, hits: np.ndarray, domain_ids: np.ndarray) -> None:
        np.add.at(self.seen, domain_ids, 1)
        np.add.at(self.correct, domain_ids, hits.astype(np.int64))
        total = (self.cum_correct[-1] if self.cum_correct else 0) + int(hits.sum())
        self.ends.append((self.ends[-1] if self.ends else 0) + len(hits))
        self.cum_correct.append(total)
        self.last_domain.append(int(domain_ids[-1]))

    def curve(self, domains: Sequence[Domain], points: int = CURVE_POINTS) -> Curve:
        """About ``points`` samples of online accuracy, at batch ends spread evenly over the stream."""
        if not self.ends:
            return Curve(positions=[], cumulative=[], window=[], domain=[])
        ends = np.asarray(self.ends)
        cum = np.asarray(self.cum_correct)
        targets = np.linspace(ends[-1] / points, ends[-1], points)
        picks = np.unique(np.minimum(np.searchsorted(ends, targets), len(ends) - 1))
        prev_end = np.concatenate([[0], ends[picks][:-1]])
        prev_cum = np.concatenate([[0], cum[picks][:-1]])
        window = (cum[picks] - prev_cum) / np.maximum(ends[picks] - prev_end, 1)
        return Curve(
            positions=[int(e) for e in ends[picks]],
            cumulative=[round(100 * float(c) / float(e), 3) for c, e in zip(cum[picks], ends[picks], strict=True)],
            window=[round(100 * float(w), 3) for w in window],
            domain=[domains[self.last_domain[i]].name for i in picks],
        )


def subset(data: LabeledImages, limit: int | None, seed: int) -> LabeledImages:
    """A seeded random subset of ``limit`` images, kept in dataset order (all images if no limit).

    Random rather than the first ``limit``, because ImageFolder datasets are sorted by class.
    """
    if limit is None or limit >= len(data):
        return data
    if limit < 1:
        raise EvalError(f"--limit must be positive, got {limit}")
    picks = np.sort(np.random.default_rng([seed, 12345]).choice(len(data), size=limit, replace=False))
    return data.subset(picks)


def auxiliary_info(setup: MethodSetup) -> dict[str, ModelInfo]:
    """Which auxiliary models (role -> name, arch, hash) the method ran with, for the result file."""
    return {role: ModelInfo(name=a.spec.name, arch=a.spec.arch, sha256=a.sha256) for role, a in setup.auxiliary.items()}


@dataclass
class WorkCounter:
    """Sums what every step's ``StepInfo`` reports (passes, samples used and filtered)."""

    steps: int = 0
    adapted_steps: int = 0
    samples: int = 0
    samples_used: int = 0
    samples_filtered: int = 0
    forwards: int = 0
    backwards: int = 0

    def add(self, info: StepInfo) -> None:
        self.steps += 1
        self.adapted_steps += int(info.adapted)
        self.samples += info.samples
        self.samples_used += info.samples_used
        self.samples_filtered += info.samples_filtered
        self.forwards += info.forwards
        self.backwards += info.backwards

    def record(self) -> Work:
        return Work(**dataclasses.asdict(self))


def run_stream(
    setup: MethodSetup,
    state: StreamState,
    stream: CorruptionStream,
    device: str,
    progress: Progress,
    work: WorkCounter,
) -> tuple[Tally, int, float, float]:
    """Feed the stream through the adapter; returns (tally, resets, data seconds, adapt seconds).

    ``work`` accumulates every step's reported passes and sample counts.
    """
    adapter, prepared = setup.adapter, setup.model
    tally = Tally(len(stream.domains))
    resets, data_s, adapt_s = 0, 0.0, 0.0
    batches = iter(stream)
    first = True
    while True:
        t0 = time.perf_counter()
        batch = next(batches, None)
        t1 = time.perf_counter()
        data_s += t1 - t0
        if batch is None:
            break
        if batch.reset and not first:
            state = adapter.reset(prepared, state)
            resets += 1
        first = False
        x = model_inputs(batch.x, setup.spec, device)
        result = adapter.step(prepared, x, state)
        state = result.state
        work.add(result.info)
        predicted = result.logits.detach().argmax(dim=1).cpu().numpy()
        adapt_s += time.perf_counter() - t1
        tally.add(predicted == batch.y, batch.domain_ids)
        progress.advance(len(batch.y), stream.domains[int(batch.domain_ids[-1])].name)
    return tally, resets, data_s, adapt_s


def run_eval(spec: EvalSpec, progress: Progress | None = None) -> EvalResult:
    """Load model, method and data as ``spec`` says, run the stream, and return the scores.

    ``spec.threads`` sets torch's intra-op threads for the run (restored afterwards): on a
    busy machine one thread can be several times faster than oversubscribed cores.
    """
    previous_threads = torch.get_num_threads()
    if spec.threads is not None:
        torch.set_num_threads(spec.threads)
    try:
        return _run_eval(spec, progress or SilentProgress())
    finally:
        torch.set_num_threads(previous_threads)


def _run_eval(spec: EvalSpec, progress: Progress) -> EvalResult:
    wall0 = time.perf_counter()
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    domains = spec.domains()
    catalogue = build_catalogue(spec.models_dir, spec.model_config_file)
    loaded = catalogue.load(spec.model, spec.device)
    setup = setup_method(loaded, spec.method, spec.method_config, lambda name: catalogue.load(name, spec.device))
    adapter = setup.adapter

    t0 = time.perf_counter()
    source = load_labeled_images(spec.data, spec.cache_dir)
    data_seed = spec.seed if spec.stream_seed is None else spec.stream_seed
    data = subset(source, spec.limit, data_seed)
    if len(data.classes) > len(loaded.spec.classes):
        raise EvalError(
            f"the data has {len(data.classes)} classes but model '{spec.model}' predicts {len(loaded.spec.classes)}"
        )
    load_s = time.perf_counter() - t0

    torch.manual_seed(spec.seed)
    state = adapter.init_state(setup.model, spec.seed, loaded.sha256)
    with CorruptedSets(data, data_seed, spec.cache_dir, persistent=spec.persistent_cache) as sets:
        stream = CorruptionStream(spec.setting, domains, data.y, sets, spec.batch_size, data_seed, spec.dirichlet_delta)
        progress.start(stream.n_samples, domains[0].name)
        work = WorkCounter()
        tally, resets, data_s, adapt_s = run_stream(setup, state, stream, spec.device, progress, work)
    scores = [
        DomainScore(
            corruption=d.corruption,
            severity=d.severity,
            n=int(tally.seen[i]),
            correct=int(tally.correct[i]),
            accuracy=round(100 * tally.correct[i] / max(tally.seen[i], 1), 3),
            error=round(100 - 100 * tally.correct[i] / max(tally.seen[i], 1), 3),
        )
        for i, d in enumerate(domains)
    ]
    n_images = int(tally.seen.sum())
    return EvalResult(
        model=ModelInfo(name=loaded.spec.name, arch=loaded.spec.arch, sha256=loaded.sha256),
        method=spec.method,
        method_config=adapter.config.model_dump(mode="json"),
        config_overrides=dict(spec.method_config),
        auxiliary_models=auxiliary_info(setup),
        predicts=str(getattr(adapter, "predicts", "")),
        setting=spec.setting.value,
        batch_size=spec.batch_size,
        severity=domains[0].severity,
        dirichlet_delta=spec.dirichlet_delta if spec.setting is Setting.CORRELATED else None,
        seed=spec.seed,
        stream_seed=spec.stream_seed,
        limit=spec.limit,
        dataset=DatasetInfo(
            path=str(spec.data),
            fingerprint=dataset_fingerprint(data),
            n_source=len(source),
            n=len(data),
            image_size=(int(data.x.shape[1]), int(data.x.shape[2])),
            classes=len(data.classes),
        ),
        domains=scores,
        mean_error=round(float(np.mean([s.error for s in scores])), 3),
        mean_accuracy=round(float(np.mean([s.accuracy for s in scores])), 3),
        n_images=n_images,
        n_batches=len(tally.ends),
        resets=resets,
        timing=Timing(
            wall_s=round(time.perf_counter() - wall0, 3),
            data_s=round(load_s + data_s, 3),
            adapt_s=round(adapt_s, 3),
            images_per_s=round(n_images / max(adapt_s, 1e-9), 1),
        ),
        work=work.record(),
        curve=tally.curve(domains),
        device=spec.device,
        threads=torch.get_num_threads(),
        versions=package_versions(),
        machine=machine_info(),
        started_at=started,
        command=spec.command,
    )
