"""``source``: no adaptation, the frozen model in eval mode (the baseline every row is compared with).

- Prediction: plain forward with the source statistics; nothing is updated.
- Batch size 1: identical to any batch size (every sample is independent).
- Norms: BN, GN and LN (nothing is adapted, so every model is supported).
- ``step_many``: one forward over every segment's images (eval-mode norms are per sample).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from adapters.base import Adapter, MethodConfig, Segment, StepInfo, StepResult, StreamState
from adapters.norms import NormKind
from adapters.registry import register
from adapters.segments import FusedBatch, fused_or_stepped


class SourceConfig(MethodConfig):
    """No options: the source model has nothing to tune."""


@register
class Source(Adapter[SourceConfig]):
    """Predict with the unchanged source model."""

    name = "source"
    config_cls = SourceConfig
    supported_norms = frozenset(NormKind)
    predicts = "no_update"
    batch_size_one = "identical to larger batches"

    def check_model(self, model: nn.Module) -> None:
        """Every model is supported, with or without norm layers."""

    def init_state(self, model: nn.Module, seed: int = 0, model_hash: str = "") -> StreamState:
        return StreamState({}, self.new_meta(seed, model_hash))

    @torch.no_grad()
    def step(self, model: nn.Module, x: torch.Tensor, state: StreamState, adapt: bool = True) -> StepResult:
        return self._result(model(x), state, adapt)

    def step_many(self, model: nn.Module, segments: Sequence[Segment]) -> list[StepResult]:
        """One forward over all segments: the source model treats every sample on its own."""
        return fused_or_stepped(self, model, segments, self._fused)

    @torch.no_grad()
    def _fused(self, model: nn.Module, segments: Sequence[Segment]) -> list[StepResult]:
        batch = FusedBatch.of([seg.x for seg in segments])
        out = model(batch.x)
        return [self._result(part, seg.state, seg.adapt) for part, seg in zip(batch.split(out), segments, strict=True)]

    @staticmethod
    def _result(logits: torch.Tensor, state: StreamState, adapt: bool) -> StepResult:
        info = StepInfo(adapted=False, samples=len(logits), samples_used=0)
        return StepResult(logits, state.with_meta(step=state.meta.step + int(adapt)), info)
