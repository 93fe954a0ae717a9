"""``alpha_bn``: α-BN, a convex mix of source and current-batch BN statistics (You, Li, Zhao 2021).

Each BN layer normalizes with

    mean = w·μ_s + (1 − w)·μ_B        var = w·σ²_s + (1 − w)·σ²_B        (w = ``source_weight``)

then applies the source affine. Training-free and stateless: only the current batch is mixed in.

- Prediction: made with this batch's mixed statistics (``after_update``); the state is empty.
- Batch size 1: works, and is how the reference configs run it: μ_B, σ²_B are the image's
  spatial statistics, shrunk towards the source. A BN1d layer with one sample has no batch
  statistics and uses the source. When a channel has a single value per batch the variance
  falls back to the biased estimate (the unbiased one is undefined).
- Norms: BN only; GN/LN normalize per sample already, so α-BN would be a no-op and is rejected.
- Naming: ``source_weight`` is the weight on the SOURCE statistics (default 0.9, which equals
  the benchmark library's ``BN.ALPHA = 0.1`` on test statistics); the reference repos use
  opposite conventions, so the name says which side it weights.
- Variance: ``unbiased_var`` (default True) uses the unbiased batch variance, as the
  benchmark library's momentum-1 BN does; the paper's choice is unverified (tta-methods.md §1).
- ``prepare`` returns a copy with BN layers swapped for :class:`AlphaBatchNorm`.
- ``step_many``: one forward over every segment's images; each BN layer mixes the source with
  each segment's own batch statistics (variance correction and the B = 1 fallback per segment).
- Deviations: none known; "Core" (the paper's class-correlation loss) is not implemented because
  its loss could not be verified.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from adapters.base import Adapter, MethodConfig, Segment, StepInfo, StepResult, StreamState
from adapters.functional import forward, model_device, per_layer, var_mean
from adapters.layers import StreamBatchNorm, check_source_statistics, prepared_layers, swap_batchnorms
from adapters.norms import NormKind
from adapters.registry import register
from adapters.segments import FusedBatch, fused_or_stepped


def mix_statistics(
    source_mean: torch.Tensor,
    source_var: torch.Tensor,
    batch_mean: torch.Tensor,
    batch_var: torch.Tensor,
    source_weight: torch.Tensor | float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """α-BN's convex mix of source and batch statistics (``source_weight`` on the source side)."""
    mean = source_weight * source_mean + (1 - source_weight) * batch_mean
    var = source_weight * source_var + (1 - source_weight) * batch_var
    return mean, var


class AlphaBatchNorm(StreamBatchNorm):
    """BN normalizing with a mix of source and batch statistics.

    Per-call tensors: ``source_weight`` (scalar; absent -> the source layer) and ``unbiased``
    (scalar 1.0 -> unbiased batch variance, 0.0 -> biased).
    """

    source_weight: torch.Tensor | None
    unbiased: torch.Tensor | None

    def __init__(self, source: _BatchNorm) -> None:
        super().__init__(source)
        self.register_buffer("source_weight", None)
        self.register_buffer("unbiased", None)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        if self.segment_index is not None and self.source_weight is not None:
            return self.segmented_forward(input, self.source_weight)
        per_channel = input.numel() // input.shape[1]
        if self.source_weight is None or per_channel < 2:
            return self.source_forward(input)
        source_mean, source_var = self.source_stats()
        var, mean = var_mean(input, self.batch_dims(input))
        if self.unbiased is not None:  # scale by n/(n-1) where the flag is 1, without a host sync
            var = var * (1 + self.unbiased * (per_channel / (per_channel - 1) - 1))
        mean, var = mix_statistics(source_mean, source_var, mean, var, self.source_weight)
        return self.normalize(input, mean, var)

    def segmented_forward(self, x: torch.Tensor, source_weight: torch.Tensor) -> torch.Tensor:
        """The mix per segment: each segment's own batch statistics, the source where it has one value per channel."""
        source_mean, source_var = self.source_stats()
        var, mean, count = self.segment_batch_stats(x)
        if self.unbiased is not None:
            factor = count / (count - 1).clamp_min(1.0)
            var = var * (1 + self.unbiased * (factor - 1))[:, None]
        mean, var = mix_statistics(source_mean, source_var, mean, var, source_weight)
        segments = len(count)
        mean, var = self.where_small(x, count, self.reference_stats(segments), (mean, var))
        return self.normalize_segments(x, mean, var)


class AlphaBNConfig(MethodConfig):
    """Defaults of the benchmark library's ``norm_alpha`` (test weight 0.1 = source weight 0.9)."""

    source_weight: float = Field(0.9, ge=0.0, le=1.0, description="weight on the source statistics")
    unbiased_var: bool = True


@register
class AlphaBN(Adapter[AlphaBNConfig]):
    """Normalize with source statistics shrunk towards the current batch's (training-free)."""

    name = "alpha_bn"
    config_cls = AlphaBNConfig
    supported_norms = frozenset({NormKind.BN})
    predicts = "after_update"
    batch_size_one = "works: the image's spatial statistics shrunk towards the source"

    def check_model(self, model: nn.Module) -> None:
        super().check_model(model)
        check_source_statistics(model)

    def prepare(self, model: nn.Module) -> nn.Module:
        """A copy with BN layers swapped for :class:`AlphaBatchNorm` (input model untouched)."""
        return swap_batchnorms(model, AlphaBatchNorm)

    def init_state(self, model: nn.Module, seed: int = 0, model_hash: str = "") -> StreamState:
        """Empty: the mix uses only the source and the current batch."""
        return StreamState({}, self.new_meta(seed, model_hash))

    @torch.no_grad()
    def step(self, model: nn.Module, x: torch.Tensor, state: StreamState, adapt: bool = True) -> StepResult:
        return self._result(forward(model, self._call(model), x), state, adapt)

    def step_many(self, model: nn.Module, segments: Sequence[Segment]) -> list[StepResult]:
        """One forward over all segments, each mixing the source with its own batch statistics."""
        return fused_or_stepped(self, model, segments, self._fused)

    @torch.no_grad()
    def _fused(self, model: nn.Module, segments: Sequence[Segment]) -> list[StepResult]:
        batch = FusedBatch.of([seg.x for seg in segments])
        call = {**self._call(model), **batch.per_layer(prepared_layers(model, AlphaBatchNorm))}
        out = forward(model, call, batch.x)
        return [self._result(part, seg.state, seg.adapt) for part, seg in zip(batch.split(out), segments, strict=True)]

    def _call(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Per-call tensors: the source weight and the variance flag for every swapped layer."""
        device = model_device(model)
        names = prepared_layers(model, AlphaBatchNorm)
        weight = torch.tensor(self.config.source_weight, device=device)
        unbiased = torch.tensor(float(self.config.unbiased_var), device=device)
        return {**per_layer(names, "source_weight", weight), **per_layer(names, "unbiased", unbiased)}

    @staticmethod
    def _result(logits: torch.Tensor, state: StreamState, adapt: bool) -> StepResult:
        samples = len(logits)
        info = StepInfo(adapted=adapt, samples=samples, samples_used=samples if adapt else 0)
        return StepResult(logits, state.with_meta(step=state.meta.step + int(adapt)), info)
