"""``adab2n``: AdaB²N-TTA, Mechanism A of AdaB²N (Lyu et al., NeurIPS 2023) as a BN-statistics estimator.

AdaB²N's "balance" part replaces BN's fixed momentum by a recursion η_t = η_{t−1}/(η_{t−1} + (1−m)^κ),
which converges to η* = 1 − (1−m)^κ (κ stretches the EMA horizon by about 1/κ). Here, per stream,
each BN layer keeps running statistics that start at the source and are updated per batch

    μ ← μ + η·(μ_B − μ)        σ² ← (1 − η)·σ² + η·σ²_B        (biased σ²_B, as the paper)

and the batch is normalized with the updated statistics (``normalize="updated"``, BN-EMA style
in one pass) or, for strict causality, the statistics before this batch (``"current"``).

- The source is a prior: η starts at the fixed point η* (so the first batch cannot overwrite the
  source, which η_1 = m^κ ≈ 0.79 would), or, with ``source_prior_batches = t0``, at η_{t0+1} of
  the recursion (as if t0 source batches had been seen; 0 reproduces the paper's start).
- Optional batch-size awareness: η_B = 1 − (1 − η)^(B / batch_size_ref).
- Prediction: ``after_update`` with ``normalize="updated"`` (default); the class attribute states
  the default, ``"current"`` makes it before-update.
- Batch size 1: works as a slow EMA of instance statistics (prefer small κ); a BN1d layer with one
  sample has no statistics and is left unchanged for that batch.
- Norms: BN only (GN/LN rejected).
- State: per BN layer its running mean and variance (under the model's own buffer names, so
  :meth:`export_tensors` is loadable into the plain model), plus η and the batch count t.
- ``prepare`` returns a copy with BN layers swapped for :class:`AdaB2NBatchNorm`.
- Deviations: this test-time mapping is our design (tta-methods.md §5.3), not the paper's
  continual-learning setting; Mechanism B (Bayesian task weighting) needs labels and task ids
  and is not implemented. κ and m have no published TTA defaults; κ = 0.4 (η* ≈ 0.041) is the
  middle of the paper's grid.
- ``adapt=False``: the same prediction, statistics, η and t unchanged.
- ``step_many``: one forward over every segment's images; each BN layer holds every segment's
  running statistics stacked (S, C) and its own η, and updates each from that segment's batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from pydantic import Field
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from adapters.base import Adapter, MethodConfig, Segment, StepInfo, StepResult, StreamState
from adapters.functional import (
    Tensors,
    bn_statistics,
    cloned,
    forward,
    on_device,
    per_layer,
    prefixed,
    unprefixed,
    var_mean,
)
from adapters.layers import StreamBatchNorm, check_source_statistics, prepared_layers, swap_batchnorms
from adapters.norms import NormKind
from adapters.registry import register
from adapters.segments import FusedBatch, fused_or_stepped, row, segment_names, stacked

STATS = "stats/"
ETA = "eta"
COUNT = "t"
HYPER = "adab2n_hyper"


def eta_fixed_point(momentum: float, kappa: float) -> float:
    """η* = 1 − (1 − m)^κ, the fixed point of the recursion (0 for κ = 0: a cumulative average)."""
    return 1.0 - math.pow(1.0 - momentum, kappa)


def eta_next(eta: float, momentum: float, kappa: float) -> float:
    """One step of AdaB²N's recursion: η_t = η_{t−1} / (η_{t−1} + (1 − m)^κ)."""
    return eta / (eta + math.pow(1.0 - momentum, kappa))


def eta_at(t: int, momentum: float, kappa: float) -> float:
    """η_t of the recursion started at η_1 = m^κ, in closed form.

    With u = 1/η: u_t = 1 + q·u_{t−1}, q = (1 − m)^κ, so u_t = q^{t−1}·u_1 + (1 − q^{t−1})/(1 − q)
    (u_t = u_1 + t − 1 when q = 1).
    """
    if t < 1:
        raise ValueError("t counts batches from 1")
    q = math.pow(1.0 - momentum, kappa)
    u1 = math.pow(momentum, -kappa)
    if q == 1.0:
        return 1.0 / (u1 + t - 1)
    qt = math.pow(q, t - 1)
    return 1.0 / (qt * u1 + (1.0 - qt) / (1.0 - q))


def batch_eta(eta: float, batch: int, batch_size_ref: int | None) -> float:
    """η for this call: η itself, or 1 − (1 − η)^(B / B_ref) when batch-size correction is on."""
    if batch_size_ref is None:
        return eta
    return 1.0 - math.pow(1.0 - eta, batch / batch_size_ref)


class AdaB2NBatchNorm(StreamBatchNorm):
    """BN whose per-stream running statistics move by η per batch.

    Per-call tensors: the stream's ``running_mean``/``running_var`` (substituted for the source
    ones and updated in place: the caller passes clones) and ``adab2n_hyper`` = [η, use_updated]
    (use_updated = 1 normalizes with the updated statistics, 0 with the current ones). Absent
    hyper -> plain eval with whatever running statistics are in place (no update).
    """

    adab2n_hyper: torch.Tensor | None

    def __init__(self, source: _BatchNorm) -> None:
        super().__init__(source)
        self.register_buffer(HYPER, None)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        hyper = self.adab2n_hyper
        if self.segment_index is not None and hyper is not None:
            return self.segmented_forward(input, hyper)
        if hyper is None or input.numel() // input.shape[1] < 2:
            return self.source_forward(input)
        run_mean, run_var = self.source_stats()
        with torch.no_grad():
            var_b, mean_b = var_mean(input, self.batch_dims(input))
            eta, use_updated = hyper[0], hyper[1]
            new_mean = run_mean + eta * (mean_b - run_mean)
            new_var = (1 - eta) * run_var + eta * var_b
            mean = use_updated * new_mean + (1 - use_updated) * run_mean
            var = use_updated * new_var + (1 - use_updated) * run_var
            run_mean.copy_(new_mean)
            run_var.copy_(new_var)
        return self.normalize(input, mean, var)

    def segmented_forward(self, x: torch.Tensor, hyper: torch.Tensor) -> torch.Tensor:
        """Every segment's statistics move by its own η; a segment with one value per channel keeps them."""
        run_mean, run_var = self.reference_stats(len(hyper))
        with torch.no_grad():
            var_b, mean_b, count = self.segment_batch_stats(x)
            eta, use_updated = hyper[:, :1], hyper[:, 1:]
            new_mean = run_mean + eta * (mean_b - run_mean)
            new_var = (1 - eta) * run_var + eta * var_b
            new_mean, new_var = self.where_small(x, count, (run_mean, run_var), (new_mean, new_var))
            mean = use_updated * new_mean + (1 - use_updated) * run_mean
            var = use_updated * new_var + (1 - use_updated) * run_var
            if self.segment_mean is not None and self.segment_var is not None:
                self.segment_mean.copy_(new_mean)
                self.segment_var.copy_(new_var)
        return self.normalize_segments(x, mean, var)


class AdaB2NConfig(MethodConfig):
    """κ from the middle of the paper's grid {0.1, 0.4, 0.7, 1.0}; m = 0.1 (BN's default momentum)."""

    kappa: float = Field(0.4, ge=0.0, le=1.0, description="0: cumulative average, 1: BN-EMA with momentum m")
    momentum: float = Field(0.1, gt=0.0, lt=1.0, description="BN momentum m of the recursion")
    source_prior_batches: int | None = Field(
        None, ge=0, le=1_000_000, description="None: start η at the fixed point; t0: as if t0 source batches were seen"
    )
    batch_size_ref: int | None = Field(None, ge=1, le=65536, description="B_ref of the batch-size correction; None=off")
    normalize: Literal["updated", "current"] = "updated"


@register
class AdaB2N(Adapter[AdaB2NConfig]):
    """Per-stream BN statistics with AdaB²N's adaptive momentum, the source as prior."""

    name = "adab2n"
    config_cls = AdaB2NConfig
    supported_norms = frozenset({NormKind.BN})
    predicts = "after_update"
    batch_size_one = "works: a slow EMA of instance statistics (prefer small kappa)"

    def check_model(self, model: nn.Module) -> None:
        super().check_model(model)
        check_source_statistics(model)

    def prepare(self, model: nn.Module) -> nn.Module:
        """A copy with BN layers swapped for :class:`AdaB2NBatchNorm` (input model untouched)."""
        return swap_batchnorms(model, AdaB2NBatchNorm)

    def initial_eta(self) -> float:
        """η of the first test batch: the fixed point, or η_{t0+1} after t0 virtual source batches."""
        cfg = self.config
        if cfg.source_prior_batches is None:
            return eta_fixed_point(cfg.momentum, cfg.kappa)
        return eta_at(cfg.source_prior_batches + 1, cfg.momentum, cfg.kappa)

    def init_state(self, model: nn.Module, seed: int = 0, model_hash: str = "") -> StreamState:
        prepared_layers(model, AdaB2NBatchNorm)
        tensors = prefixed(STATS, bn_statistics(model))
        device = next(iter(tensors.values())).device if tensors else torch.device("cpu")
        tensors[ETA] = torch.tensor(self.initial_eta(), dtype=torch.float64, device=device)
        tensors[COUNT] = torch.zeros((), dtype=torch.int64, device=device)
        return StreamState(tensors, self.new_meta(seed, model_hash))

    @torch.no_grad()
    def step(self, model: nn.Module, x: torch.Tensor, state: StreamState, adapt: bool = True) -> StepResult:
        tensors = on_device(state.tensors, x.device)
        stats = cloned(unprefixed(STATS, tensors))  # the layers update these in place
        hyper = self._hyper(tensors, len(x), x.device)
        call = {**stats, **per_layer(prepared_layers(model, AdaB2NBatchNorm), HYPER, hyper)}
        logits = forward(model, call, x)
        return self._result(logits, state, tensors, stats, float(hyper[0]), adapt)

    def step_many(self, model: nn.Module, segments: Sequence[Segment]) -> list[StepResult]:
        """One forward over all segments, each with its own running statistics and η."""
        return fused_or_stepped(self, model, segments, self._fused)

    @torch.no_grad()
    def _fused(self, model: nn.Module, segments: Sequence[Segment]) -> list[StepResult]:
        batch = FusedBatch.of([seg.x for seg in segments])
        device = batch.x.device
        tensors = [on_device(seg.state.tensors, device) for seg in segments]
        stats = stacked([unprefixed(STATS, t) for t in tensors])  # fresh tensors: the layers update them
        hyper = torch.stack([self._hyper(t, len(seg.x), device) for t, seg in zip(tensors, segments, strict=True)])
        names = prepared_layers(model, AdaB2NBatchNorm)
        call = {**segment_names(stats), **per_layer(names, HYPER, hyper), **batch.per_layer(names)}
        logits = batch.split(forward(model, call, batch.x))
        return [
            self._result(out, seg.state, t, row(stats, i), float(hyper[i, 0]), seg.adapt)
            for i, (out, seg, t) in enumerate(zip(logits, segments, tensors, strict=True))
        ]

    def _hyper(self, tensors: Tensors, batch: int, device: torch.device) -> torch.Tensor:
        """[η for this batch size, normalize-with-updated flag]: the layers' per-call hyperparameters."""
        eta = batch_eta(float(tensors[ETA]), batch, self.config.batch_size_ref)
        return torch.tensor([eta, float(self.config.normalize == "updated")], device=device)

    def _result(
        self, logits: torch.Tensor, state: StreamState, tensors: Tensors, stats: Tensors, eta: float, adapt: bool
    ) -> StepResult:
        """The step's result from its logits and the statistics the layers updated."""
        cfg = self.config
        samples = len(logits)
        extra = {"eta": eta}
        info = StepInfo(adapted=adapt, samples=samples, samples_used=samples if adapt else 0, extra=extra)
        if not adapt:
            return StepResult(logits, state, info)
        new = prefixed(STATS, stats)
        old_eta = float(tensors[ETA])
        new[ETA] = torch.tensor(eta_next(old_eta, cfg.momentum, cfg.kappa), dtype=torch.float64, device=logits.device)
        new[COUNT] = tensors[COUNT] + 1
        return StepResult(logits, StreamState(new, state.meta).with_meta(step=state.meta.step + 1), info)

    def export_tensors(self, state: StreamState) -> tuple[int, dict[str, torch.Tensor]]:
        """The stream's BN running statistics under the model's buffer names (loadable into the plain model)."""
        return state.meta.step, unprefixed(STATS, state.tensors)
