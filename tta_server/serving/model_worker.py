"""The model worker: runs streams' batches through their adapters, on the one device thread.

For each batch: take the stream's latest state from the store (or the method's source state),
turn the images into the model's input (:func:`~tta_server.serving.method_setup.model_inputs`),
call ``adapter.step`` on the shared prepared model, and write the new state back with the
version it was based on. Then the observers (metrics, drift) look at the finished step; they
cannot change it. The shared models are only ever read.

Every method here is called with the stream's registration already read by the caller (the
stream service reads it once per request) and runs on the worker thread, never on the event
loop.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from safetensors.torch import save as save_tensors
from torch import nn

from adapters.base import Adapter, Segment, StepInfo, StepResult, StreamState
from adapters.errors import StateMismatchError
from adapters.serialize import state_from_bytes, state_to_bytes
from tta_server.models import ModelHub
from tta_server.observability.tracing import span
from tta_server.serving.batcher import Job, JobResults
from tta_server.serving.drift import ScoredProbs
from tta_server.serving.method_setup import MethodSetup, model_inputs, prepare_copy, setup_key, setup_method
from tta_server.serving.observers import Observers, StepEvent
from tta_server.serving.record_cache import RecordCache
from tta_server.serving.state_checks import check_state_fits
from tta_server.state.base import StateStore, StreamRecord, VersionConflictError
from tta_server.zoo.catalogue import LoadedModel

log = logging.getLogger(__name__)

CAS_ATTEMPTS = 5
"""How often a batch is recomputed when another replica wrote the stream concurrently."""

FORWARD_ONLY = frozenset({"source", "bn", "alpha_bn", "unmix_tns", "adab2n"})
"""Methods whose step is a forward pass alone (no gradient): the only ones the ``autocast`` setting touches,
because a half-precision backward would change what a gradient method learns, not just what it answers."""
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class BatchOutput(NamedTuple):
    """Result of one batch: probabilities on the CPU and where the stream stands now."""

    scored: ScoredProbs
    step: int
    version: int
    adapted: bool
    info: StepInfo
    classes: tuple[str, ...]

    @property
    def probs(self) -> np.ndarray:
        return self.scored.probs


def host_probabilities(logits: torch.Tensor) -> np.ndarray:
    """Softmax over classes as float32 numpy on the host: the step's answer for the client and the observers.

    The detach, the cast to float32 and the copy to the host run only where they change something:
    each is a dispatched op even when it returns its input, and together they cost ~0.7 us of the
    ~3.4 us this takes for a single-image answer on the CPU.
    """
    if logits.requires_grad:
        logits = logits.detach()
    if logits.dtype is not torch.float32:
        logits = logits.float()
    probs = torch.softmax(logits, dim=1)
    return (probs if probs.is_cpu else probs.cpu()).numpy()


class ModelWorker:
    """Method setups (prepared models, bound adapters) and per-stream steps for one device."""

    def __init__(
        self,
        hub: ModelHub,
        store: StateStore,
        observers: Observers,
        *,
        channels_last: bool = True,
        autocast: str | None = None,
    ) -> None:
        self.hub = hub
        self.store = store
        self.observers = observers
        self.channels_last = channels_last
        self.autocast = autocast if hub.device.startswith("cuda") else None
        if autocast is not None and self.autocast is None:
            # measured (benchmarks/results/autocast_agreement.md): on the CPU, bf16 autocast breaks the
            # BN-adapting methods (batch_norm refuses bf16 input with fp32 statistics) and ran 8x slower
            log.warning("autocast=%s applies on CUDA only; %s runs in fp32", autocast, hub.device)
        self._setups: dict[tuple[str, str, str], MethodSetup] = {}
        self._prepared: dict[tuple[str, str], nn.Module] = {}
        self._record_setups = RecordCache(lambda record: self.setup(record.model, record.method, record.config))
        self._lock = threading.RLock()

    # -- setups ---------------------------------------------------------------------------
    def _prepare_shared(self, loaded: LoadedModel, adapter: Adapter[Any]) -> nn.Module:
        """One prepared copy of a catalogue model per (model, method), never per stream."""
        with self._lock:
            key = (loaded.spec.name, adapter.name)
            if key not in self._prepared:
                self._prepared[key] = prepare_copy(loaded, adapter)
            return self._prepared[key]

    def setup(self, model_name: str, method: str, config: Mapping[str, Any]) -> MethodSetup:
        """The method set up on the model (cached per config); raises adapter and catalogue errors."""
        cache_key = setup_key(model_name, method, config)
        with self._lock:
            if cache_key not in self._setups:
                self._setups[cache_key] = setup_method(
                    self.hub.get(model_name), method, config, self.hub.get, self._prepare_shared
                )
            return self._setups[cache_key]

    def validate(self, model_name: str, method: str, config: Mapping[str, Any]) -> dict[str, Any]:
        """Registration-time checks: model exists, config valid, method supports the model.

        Returns the config with defaults filled in, which is what the stream stores.
        """
        normalized: dict[str, Any] = self.setup(model_name, method, config).adapter.config.model_dump(mode="json")
        return normalized

    def _setup_of(self, record: StreamRecord) -> MethodSetup:
        """The record's setup, remembered per registration object (:class:`RecordCache`)."""
        return self._record_setups(record)

    # -- state ----------------------------------------------------------------------------
    def current_state(self, record: StreamRecord, setup: MethodSetup) -> tuple[StreamState, int, int]:
        """(state, version, samples seen); the source state at version 0 before the first write."""
        stored = self.store.load_state(record.key)
        loaded = setup.loaded
        if stored is not None:
            if stored.state.meta.model_hash != loaded.sha256:
                made_for = stored.state.meta.model_hash[:12]
                raise StateMismatchError(
                    f"stream '{record.key.stream_id}' holds a state made for weights {made_for}, "
                    f"but model '{record.model}' now has weights {loaded.sha256[:12]}; reset the stream "
                    "(POST /v1/streams/{id}/reset) or serve the new weights under a new model name"
                )
            return stored.state, stored.version, stored.samples_seen
        return setup.adapter.init_state(setup.model, record.seed, loaded.sha256), 0, 0

    # -- the hot path ---------------------------------------------------------------------
    def run_jobs(self, jobs: Sequence[Job]) -> JobResults[BatchOutput]:
        """Run one batch: one stream alone, or several streams of one method setup fused.

        Fused streams share one ``adapter.step_many`` call (one forward pass over all their
        images, statistics per stream). Each stream's state is loaded and written on its own; a
        stream whose state cannot be loaded, or whose write lost a compare-and-set race, is
        answered on its own (the error, or a recomputed step) without touching the others. Deferred
        observers (drift) run after the answers were handed back (``after``), off the requests' path.
        """
        events: list[StepEvent] = []
        if len(jobs) == 1:
            results: list[BatchOutput | BaseException] = [self._run_one(jobs[0], events)]
        else:
            results = self._run_fused(jobs, events)
        if not self.observers.notify_all(events):
            return JobResults(results)
        return JobResults(results, after=lambda: self._observe_deferred(events))

    def _observe_deferred(self, events: list[StepEvent]) -> None:
        """The observers' deferred pass (drift's source-model forward), after the answers were handed back."""
        self.observers.notify_all(events, deferred=True)

    def _step_mode(self, setup: MethodSetup) -> contextlib.AbstractContextManager[Any]:
        """The grad mode and precision a step runs under.

        A forward-only method's step runs under ``torch.inference_mode``: no autograd bookkeeping on
        any op (the adapters' own ``no_grad`` still records version counters and view metadata);
        measured ~50 us less CPU per ResNet-20 forward on one CPU thread, the same numbers. Its state
        tensors are then inference tensors, which the store, exports and later steps only read or
        replace, never update in place outside a step. The gradient methods keep autograd.
        Autocast wraps a forward-only step when the ``autocast`` setting asks (CUDA only); only then
        is an ``ExitStack`` built (it costs more than the step's other bookkeeping on a small batch).
        """
        if setup.adapter.name not in FORWARD_ONLY:
            return contextlib.nullcontext()
        if self.autocast is None:
            return torch.inference_mode()
        mode = contextlib.ExitStack()
        mode.enter_context(torch.inference_mode())
        device_type = "cuda" if self.hub.device.startswith("cuda") else "cpu"
        mode.enter_context(torch.autocast(device_type, dtype=AUTOCAST_DTYPES[self.autocast]))
        return mode

    def _run_one(self, job: Job, events: list[StepEvent]) -> BatchOutput:
        """One stream's step with compare-and-set: recomputed from the newer state if another replica wrote.

        Up to ``CAS_ATTEMPTS`` times, so no acknowledged adaptation step is ever lost.
        """
        record, adapt = job.record, job.adapt
        setup = self._setup_of(record)
        x = model_inputs(job.images, setup.spec, self.hub.device, self.channels_last)
        for attempt in range(1, CAS_ATTEMPTS + 1):
            state, version, seen = self.current_state(record, setup)
            started = time.perf_counter()
            with span("tta.step"), self._step_mode(setup):
                result = setup.adapter.step(setup.model, x, state, adapt=adapt)
            elapsed = time.perf_counter() - started
            try:
                return self._finish(job, setup, x, result, version, seen, elapsed, events)
            except VersionConflictError:
                self.observers.metrics.store_errors.labels("version_conflict").inc()
                if attempt == CAS_ATTEMPTS:
                    raise
        raise AssertionError("unreachable")

    def _finish(
        self,
        job: Job,
        setup: MethodSetup,
        x: torch.Tensor,
        result: StepResult,
        version: int,
        seen: int,
        elapsed: float,
        events: list[StepEvent],
        scored: ScoredProbs | None = None,
    ) -> BatchOutput:
        """Write the step's state (compare-and-set) and describe the outcome; raises on a lost race.

        ``scored``: the stream's rows of a fused batch's probabilities, already on the host with their
        entropy and confidence (one device-to-host copy and one pass for the whole batch).
        """
        new_version = version
        if job.adapt:
            with span("tta.store.write"):
                new_version = self.store.save_state(job.record.key, result.state, version, seen + len(job.images))
        if scored is None:
            scored = ScoredProbs.of(host_probabilities(result.logits))
        step = result.state.meta.step
        events.append(
            StepEvent(job.record, setup.loaded, x, scored, result.info, step, elapsed, job.adapt, result.state.nbytes())
        )
        return BatchOutput(scored, step, new_version, result.info.adapted, result.info, setup.spec.classes)

    def _run_fused(self, jobs: Sequence[Job], events: list[StepEvent]) -> list[BatchOutput | BaseException]:
        """Several streams of one setup in one ``step_many`` call; per-stream loads, writes and errors."""
        results: list[BatchOutput | BaseException | None] = [None] * len(jobs)
        setup = self._setup_of(jobs[0].record)
        sizes = [len(job.images) for job in jobs]
        x_all = model_inputs([job.images for job in jobs], setup.spec, self.hub.device, self.channels_last)
        xs = list(torch.split(x_all, sizes))
        loaded: list[tuple[int, StreamState, int, int]] = []
        for i, job in enumerate(jobs):
            try:
                state, version, seen = self.current_state(job.record, setup)
            except Exception as exc:  # this stream alone fails (a store outage, a state for other weights)
                results[i] = exc
                continue
            loaded.append((i, state, version, seen))
        started = time.perf_counter()
        with span("tta.step", {"tta.streams": len(loaded)}), self._step_mode(setup):
            stepped = setup.adapter.step_many(
                setup.model, [Segment(xs[i], state, jobs[i].adapt) for i, state, _, _ in loaded]
            )
        elapsed = (time.perf_counter() - started) / max(len(loaded), 1)
        scored_all = ScoredProbs.of(
            host_probabilities(torch.cat([r.logits for r in stepped]))
            if stepped
            else np.empty((0, 0), dtype=np.float32)
        )
        offsets = np.cumsum([0] + [len(r.logits) for r in stepped])
        for k, ((i, _, version, seen), result) in enumerate(zip(loaded, stepped, strict=True)):
            scored = scored_all.rows(offsets[k], offsets[k + 1])
            try:
                results[i] = self._finish(jobs[i], setup, xs[i], result, version, seen, elapsed, events, scored)
            except VersionConflictError:
                self.observers.metrics.store_errors.labels("version_conflict").inc()
                results[i] = self._retry_alone(jobs[i], events)
            except Exception as exc:
                results[i] = exc
        return [r if r is not None else RuntimeError("stream was not stepped") for r in results]

    def _retry_alone(self, job: Job, events: list[StepEvent]) -> BatchOutput | BaseException:
        """A fused stream whose write lost a race is recomputed alone from the newer state."""
        try:
            return self._run_one(job, events)
        except Exception as exc:
            return exc

    # -- management -----------------------------------------------------------------------
    def reset(self, record: StreamRecord) -> tuple[int, int]:
        """Back to source; returns (step, new version)."""
        setup = self._setup_of(record)
        stored = self.store.load_state(record.key)
        if stored is None:
            fresh = setup.adapter.init_state(setup.model, record.seed, setup.loaded.sha256)
            version, seen = 0, 0
        else:
            # a reset also re-bases a stream whose model weights changed since its last write
            fresh = setup.adapter.reset(setup.model, stored.state.with_meta(model_hash=setup.loaded.sha256))
            version, seen = stored.version, stored.samples_seen
        new_version = self.store.save_state(record.key, fresh, version, seen)
        return fresh.meta.step, new_version

    def export_state(self, record: StreamRecord) -> tuple[bytes, int]:
        """The stream's state as safetensors bytes, and its version."""
        state, version, _ = self.current_state(record, self._setup_of(record))
        return state_to_bytes(state), version

    def export_parameters(self, record: StreamRecord) -> tuple[bytes, int]:
        """The adapted tensors under the model's own names (for an edge device), and their version."""
        setup = self._setup_of(record)
        state, _, _ = self.current_state(record, setup)
        version, tensors = setup.adapter.export_tensors(state)
        payload = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        meta = {"method": record.method, "model": record.model, "version": str(version)}
        return save_tensors(payload, metadata=meta), version

    def import_state(self, record: StreamRecord, blob: bytes) -> tuple[int, int]:
        """Replace the stream's state with ``blob`` after checking it fits; returns (step, version)."""
        setup = self._setup_of(record)
        incoming = state_from_bytes(blob, device=self.hub.device)
        reference = setup.adapter.init_state(setup.model, record.seed, setup.loaded.sha256)
        size = setup.spec.input_size
        check_state_fits(incoming, reference, record, setup.adapter, (3, size, size))
        # the tensors in the method's own order (the fresh state's; those a growing state added after them, by
        # name), not the order the bytes were read in: safetensors returns them in an order that varies between
        # processes, and a method that sums over its tensors (SAR's gradient norm) would round differently
        # after a restore than before it
        order = [name for name in reference.tensors if name in incoming.tensors]
        order += sorted(set(incoming.tensors) - set(order))
        incoming = StreamState({name: incoming.tensors[name] for name in order}, incoming.meta)
        _, version, seen = self.current_state(record, setup)
        new_version = self.store.save_state(record.key, incoming, version, seen)
        return incoming.meta.step, new_version
