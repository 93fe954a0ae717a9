"""The model worker: runs one stream's batch through its adapter, on one device thread.

For each batch: look up the stream's registration, take its latest state from the store
(or the method's source state), normalize the images with the model's own transform, call
``adapter.step`` on the shared prepared model, and write the new state back with the version
it was based on. The shared models are only ever read.
"""

from __future__ import annotations

import copy
import json
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from safetensors.torch import save as save_tensors
from torch import nn

from adapters import create_adapter
from adapters.base import Adapter, StepInfo, StreamState
from adapters.errors import StateMismatchError
from adapters.norms import norm_kind_of
from adapters.serialize import state_from_bytes, state_to_bytes
from tta_server.metrics import Metrics
from tta_server.models import ModelHub
from tta_server.serving.drift import BatchSignals, DriftTracker, entropy_and_confidence
from tta_server.state.base import StateStore, StreamKey, StreamRecord, VersionConflictError
from tta_server.zoo.catalogue import LoadedModel
from tta_server.zoo.transforms import normalize, to_tensor_batch

CAS_ATTEMPTS = 5
"""How often a batch is recomputed when another replica wrote the stream concurrently."""


@dataclass(frozen=True)
class BatchOutput:
    """Result of one batch: probabilities on the CPU and where the stream stands now."""

    probs: np.ndarray
    step: int
    version: int
    adapted: bool
    info: StepInfo
    classes: tuple[str, ...]


class StreamRunner:
    """Adapters, prepared models and per-stream states for one device."""

    def __init__(self, hub: ModelHub, store: StateStore, metrics: Metrics, drift: DriftTracker) -> None:
        self.hub = hub
        self.store = store
        self.metrics = metrics
        self.drift = drift
        self._adapters: dict[tuple[str, str, str], Adapter[Any]] = {}
        self._prepared: dict[tuple[str, str], nn.Module] = {}
        self._lock = threading.RLock()

    # -- caches ---------------------------------------------------------------------------
    def prepared_model(self, model_name: str, method: str, adapter: Adapter[Any]) -> nn.Module:
        """One prepared copy of a catalogue model per (model, method), never per stream."""
        with self._lock:
            key = (model_name, method)
            if key not in self._prepared:
                source = self.hub.get(model_name).model
                self._prepared[key] = adapter.prepare(copy.deepcopy(source))
            return self._prepared[key]

    def adapter(self, model_name: str, method: str, config: Mapping[str, Any]) -> Adapter[Any]:
        """The adapter for (method, config) with auxiliary models bound; raises adapter errors."""
        cache_key = (model_name, method, json.dumps(config, sort_keys=True))
        with self._lock:
            if cache_key in self._adapters:
                return self._adapters[cache_key]
            adapter = create_adapter(method, config)
            aux = {
                role: self.prepared_model(name, method, adapter) for role, name in adapter.auxiliary_models().items()
            }
            adapter.bind_auxiliary(aux)
            self._adapters[cache_key] = adapter
            return adapter

    def validate(self, model_name: str, method: str, config: Mapping[str, Any]) -> dict[str, Any]:
        """Registration-time checks: model exists, config valid, method supports the model.

        Returns the config with defaults filled in, which is what the stream stores.
        """
        loaded = self.hub.get(model_name)
        adapter = self.adapter(model_name, method, config)
        adapter.check_model(loaded.model)
        normalized: dict[str, Any] = adapter.config.model_dump(mode="json")
        return normalized

    # -- state ----------------------------------------------------------------------------
    def _context(self, record: StreamRecord) -> tuple[LoadedModel, Adapter[Any], nn.Module]:
        loaded = self.hub.get(record.model)
        adapter = self.adapter(record.model, record.method, record.config)
        return loaded, adapter, self.prepared_model(record.model, record.method, adapter)

    def current_state(
        self, record: StreamRecord, context: tuple[LoadedModel, Adapter[Any], nn.Module]
    ) -> tuple[StreamState, int, int]:
        """(state, version, samples seen); the source state at version 0 before the first write.

        ``context`` is the stream's ``_context``, looked up once by the caller.
        """
        stored = self.store.load_state(record.key)
        loaded, adapter, prepared = context
        if stored is not None:
            if stored.state.meta.model_hash != loaded.sha256:
                made_for = stored.state.meta.model_hash[:12]
                raise StateMismatchError(
                    f"stream '{record.key.stream_id}' holds a state made for weights {made_for}, "
                    f"but model '{record.model}' now has weights {loaded.sha256[:12]}; reset the stream "
                    "(POST /v1/streams/{id}/reset) or serve the new weights under a new model name"
                )
            return stored.state, stored.version, stored.samples_seen
        return adapter.init_state(prepared, record.seed, loaded.sha256), 0, 0

    # -- the hot path ---------------------------------------------------------------------
    def run_batch(self, key: StreamKey, images: np.ndarray, adapt: bool) -> BatchOutput:
        """Predict (and adapt) one batch of uint8 NHWC images for stream ``key``.

        The write is a compare-and-set on the version the step started from. If another
        replica wrote the stream in between, the step is recomputed from the newer state
        (up to ``CAS_ATTEMPTS`` times), so no acknowledged adaptation step is ever lost.
        """
        record = self.store.get_stream(key)
        context = self._context(record)
        loaded, adapter, prepared = context
        spec = loaded.spec
        x = normalize(to_device(to_tensor_batch(images), self.hub.device), spec.mean, spec.std, spec.input_size)
        labels = (record.model, record.method)
        for attempt in range(1, CAS_ATTEMPTS + 1):
            state, version, seen = self.current_state(record, context)
            started = time.perf_counter()
            result = adapter.step(prepared, x, state, adapt=adapt)
            elapsed = time.perf_counter() - started
            if not adapt:
                new_version = version
                break
            try:
                new_version = self.store.save_state(key, result.state, version, seen + len(images))
                break
            except VersionConflictError:
                self.metrics.store_errors.labels("version_conflict").inc()
                if attempt == CAS_ATTEMPTS:
                    raise
        probs = torch.softmax(result.logits.detach().float(), dim=1).cpu().numpy()
        self.metrics.inference.labels(*labels).observe(elapsed)
        self.metrics.images.labels(*labels).inc(len(images))
        if adapt:
            self.metrics.state_bytes.labels(*labels).observe(result.state.nbytes())
        info = result.info
        if info.adapted:
            self.metrics.adaptation_steps.labels(*labels).inc()
        if info.samples_filtered:
            self.metrics.samples_filtered.labels(*labels).inc(info.samples_filtered)
        if info.resets:
            self.metrics.resets.labels(*labels, "collapse").inc(info.resets)
        self._record_drift(record, loaded, x, probs, info, result.state.meta.step)
        return BatchOutput(probs, result.state.meta.step, new_version, info.adapted, info, spec.classes)

    def _record_drift(
        self, record: StreamRecord, loaded: LoadedModel, x: torch.Tensor, probs: np.ndarray, info: StepInfo, step: int
    ) -> None:
        entropy, confidence = entropy_and_confidence(probs)
        labels = (record.model, record.method)
        self.metrics.entropy.labels(*labels).observe(float(entropy.mean()))
        self.metrics.confidence.labels(*labels).observe(float(confidence.mean()))
        sampled = disagreed = 0
        bn_shift = None
        if self.drift.should_sample(step):
            source_pred, bn_shift = source_view(loaded.model, x)
            sampled = len(probs)
            disagreed = int((source_pred != probs.argmax(axis=1)).sum())
            self.metrics.disagreement.labels(*labels).observe(disagreed / sampled)
            if bn_shift is not None:
                self.metrics.bn_shift.labels(*labels).observe(bn_shift)
        counts = np.bincount(probs.argmax(axis=1), minlength=probs.shape[1])
        self.drift.record(
            record.key,
            BatchSignals(
                n=len(probs),
                entropy_sum=float(entropy.sum()),
                confidence_sum=float(confidence.sum()),
                class_counts=counts,
                filtered=info.samples_filtered,
                used=info.samples_used,
                resets=info.resets,
                sampled=sampled,
                disagreed=disagreed,
                bn_shift=bn_shift,
            ),
        )

    # -- management -----------------------------------------------------------------------
    def reset(self, key: StreamKey) -> tuple[int, int]:
        """Back to source; returns (step, new version)."""
        record = self.store.get_stream(key)
        loaded, adapter, prepared = self._context(record)
        stored = self.store.load_state(key)
        if stored is None:
            fresh, version, seen = adapter.init_state(prepared, record.seed, loaded.sha256), 0, 0
        else:
            # a reset also re-bases a stream whose model weights changed since its last write
            fresh = adapter.reset(prepared, stored.state.with_meta(model_hash=loaded.sha256))
            version, seen = stored.version, stored.samples_seen
        new_version = self.store.save_state(key, fresh, version, seen)
        self.metrics.resets.labels(record.model, record.method, "api").inc()
        return fresh.meta.step, new_version

    def export_state(self, key: StreamKey) -> tuple[bytes, int]:
        """The stream's state as safetensors bytes, and its version."""
        record = self.store.get_stream(key)
        state, version, _ = self.current_state(record, self._context(record))
        return state_to_bytes(state), version

    def export_parameters(self, key: StreamKey) -> tuple[bytes, int]:
        """The adapted tensors under the model's own names (for an edge device), and their version."""
        record = self.store.get_stream(key)
        context = self._context(record)
        state, _, _ = self.current_state(record, context)
        adapter = context[1]
        version, tensors = adapter.export_tensors(state)
        payload = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        meta = {"method": record.method, "model": record.model, "version": str(version)}
        return save_tensors(payload, metadata=meta), version

    def import_state(self, key: StreamKey, blob: bytes) -> tuple[int, int]:
        """Replace the stream's state with ``blob`` after checking it fits; returns (step, version)."""
        record = self.store.get_stream(key)
        context = self._context(record)
        loaded, adapter, prepared = context
        incoming = state_from_bytes(blob, device=self.hub.device)
        reference = adapter.init_state(prepared, record.seed, loaded.sha256)
        check_state_fits(incoming, reference, record)
        _, version, seen = self.current_state(record, context)
        new_version = self.store.save_state(key, incoming, version, seen)
        return incoming.meta.step, new_version


def check_state_fits(incoming: StreamState, reference: StreamState, record: StreamRecord) -> None:
    """Refuse a state made for another method, config or model, or with other tensors."""
    meta = incoming.meta
    if meta.method != record.method:
        raise StateMismatchError(f"state was made by method '{meta.method}', the stream uses '{record.method}'")
    if meta.model_hash != reference.meta.model_hash:
        raise StateMismatchError(
            f"state was made for model weights {meta.model_hash[:12]}, the stream's model has "
            f"{reference.meta.model_hash[:12]}"
        )
    if meta.config != reference.meta.config:
        raise StateMismatchError(f"state was made with config {meta.config}, the stream uses {reference.meta.config}")
    missing = sorted(set(reference.tensors) - set(incoming.tensors))
    extra = sorted(set(incoming.tensors) - set(reference.tensors))
    if missing or extra:
        raise StateMismatchError(f"state tensors differ: missing {missing[:5]}, unexpected {extra[:5]}")
    for name, ref in reference.tensors.items():
        got = incoming.tensors[name]
        if got.shape != ref.shape or got.dtype != ref.dtype:
            raise StateMismatchError(
                f"tensor '{name}' is {got.dtype} {tuple(got.shape)}, expected {ref.dtype} {tuple(ref.shape)}"
            )
        if got.is_floating_point() and not bool(torch.isfinite(got).all()):
            raise StateMismatchError(f"tensor '{name}' holds NaN or infinite values")


def to_device(batch: torch.Tensor, device: str) -> torch.Tensor:
    """Copy a uint8 batch to ``device``; on CUDA through pinned memory, asynchronously.

    The uint8 batch is 4x smaller than the float input, so it is what crosses the bus; the
    conversion and normalization then run on the GPU.
    """
    if not device.startswith("cuda"):
        return batch
    return batch.contiguous().pin_memory().to(device, non_blocking=True)


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
