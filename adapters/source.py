"""``source``: no adaptation, the frozen model in eval mode (the baseline every row is compared with).

- Prediction: plain forward with the source statistics; nothing is updated.
- Batch size 1: identical to any batch size (every sample is independent).
- Norms: BN, GN and LN (nothing is adapted, so every model is supported).
"""

from __future__ import annotations

import torch
from torch import nn

from adapters.base import Adapter, MethodConfig, StepInfo, StepResult, StreamState
from adapters.functional import drift_extra
from adapters.norms import NormKind
from adapters.registry import register


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
        logits = model(x)
        info = StepInfo(adapted=False, samples=len(x), samples_used=0, extra=drift_extra(logits))
        return StepResult(logits, state.with_meta(step=state.meta.step + int(adapt)), info)
