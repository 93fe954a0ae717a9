"""``bn``: BN adapt, a.k.a. BN-1 / TBN / "norm" (Schneider et al. 2020; Nado et al. 2020).

Every BN layer normalizes the batch with the batch's own statistics instead of the source
running statistics; no gradients, nothing carried between batches.

- Prediction: made *with* this batch's statistics (``predicts = "after_update"``: the batch
  itself is what the model adapts to); the stream state is empty and never changes.
- Batch size 1: runs, but BN2d then normalizes with the single image's spatial statistics
  (instance normalization), which is poor for most models; prefer ``alpha_bn``, ``unmix_tns``
  or ``adab2n`` for single-image streams. A BN1d layer with one sample keeps its source statistics.
- Norms: BN only; GN/LN models already normalize per sample and are rejected.
- ``prepare`` returns a copy of the model with BN layers swapped for
  :class:`adapters.layers.BatchStatsNorm` (called directly, the copy is still the source model).
- Deviations from the reference (mariodoebler ``BNTest``): none in the maths (biased batch
  variance, as train-mode BN); the shared model stays in eval mode and the switch to batch
  statistics is a per-call tensor, so streams never share a mode flag.
- ``adapt=False`` returns the same prediction (the method has no state to update).
- ``step_many``: one forward over every segment's images, each BN layer normalizing each
  segment with that segment's own batch statistics.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from adapters.base import Adapter, MethodConfig, Segment, StepInfo, StepResult, StreamState
from adapters.functional import forward, model_device, per_layer
from adapters.layers import BatchStatsNorm, prepared_layers, swap_batchnorms
from adapters.norms import NormKind
from adapters.registry import register
from adapters.segments import FusedBatch, fused_or_stepped


class BNConfig(MethodConfig):
    """No options: BN-1 uses the current batch's statistics, nothing to tune."""


@register
class BNAdapt(Adapter[BNConfig]):
    """Normalize every batch with its own BN statistics (test-time batch normalization)."""

    name = "bn"
    config_cls = BNConfig
    supported_norms = frozenset({NormKind.BN})
    predicts = "after_update"
    batch_size_one = "runs as instance normalization (poor); BN1d layers keep source statistics"

    def prepare(self, model: nn.Module) -> nn.Module:
        """A copy with BN layers swapped for batch-statistics layers (input model untouched)."""
        return swap_batchnorms(model, BatchStatsNorm)

    def init_state(self, model: nn.Module, seed: int = 0, model_hash: str = "") -> StreamState:
        """Empty: BN-1 keeps nothing between batches."""
        return StreamState({}, self.new_meta(seed, model_hash))

    @torch.no_grad()
    def step(self, model: nn.Module, x: torch.Tensor, state: StreamState, adapt: bool = True) -> StepResult:
        return self._result(forward(model, self._flags(model), x), state, adapt)

    def step_many(self, model: nn.Module, segments: Sequence[Segment]) -> list[StepResult]:
        """One forward over all segments; every segment normalized with its own batch statistics."""
        return fused_or_stepped(self, model, segments, self._fused)

    @torch.no_grad()
    def _fused(self, model: nn.Module, segments: Sequence[Segment]) -> list[StepResult]:
        batch = FusedBatch.of([seg.x for seg in segments])
        names = prepared_layers(model, BatchStatsNorm)
        out = forward(model, {**self._flags(model), **batch.per_layer(names)}, batch.x)
        return [self._result(part, seg.state, seg.adapt) for part, seg in zip(batch.split(out), segments, strict=True)]

    @staticmethod
    def _flags(model: nn.Module) -> dict[str, torch.Tensor]:
        """Per-call tensors that switch every swapped BN layer to batch statistics."""
        flag = torch.ones((), device=model_device(model))
        return per_layer(prepared_layers(model, BatchStatsNorm), "batch_stats", flag)

    @staticmethod
    def _result(logits: torch.Tensor, state: StreamState, adapt: bool) -> StepResult:
        samples = len(logits)
        info = StepInfo(adapted=adapt, samples=samples, samples_used=samples if adapt else 0)
        return StepResult(logits, state.with_meta(step=state.meta.step + int(adapt)), info)
