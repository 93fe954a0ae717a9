"""``unmix_tns``: UnMix-TNS, mixture-of-components test-time normalization (Tomar et al., ICLR 2024).

Every BN layer keeps K statistics components (μ_k, σ²_k). Each sample is normalized with its
own statistics: its instance statistics mixed with every component by a cosine-similarity
softmax, combined by the law of total variance; then all components move towards the
instances, weighted by the same assignment. Training-free, one forward.

- Prediction: made in the same pass that updates the components, with statistics mixed from this
  sample's instance statistics and the *pre-update* components (``predicts = "after_update"``:
  this batch shapes its own normalization; the component update is used from the next batch on).
- Batch size 1: works (the components provide batch-like statistics). The momentum is corrected
  for the batch size of *each call*: M = 1 − (1 − m)^(B / batch_size_max), so single images adapt
  slowly (M ≈ 0.00165 with the defaults), and mixed batch sizes in one stream stay consistent.
- Norms: BN only (GN/LN rejected). ``BatchNorm1d`` layers (no spatial dimensions, hence no
  instance statistics) keep the source statistics and have no components, as in the reference.
- State: per BN layer a K×C mean matrix and a K×C variance matrix; nothing else.
- ``prepare`` returns a copy with BN layers swapped for :class:`UnMixBatchNorm`.
- Deviations from the official ``unmixtns.py``: (1) M is recomputed from the actual batch size
  of each call instead of being fixed at construction (tta-methods.md §2.3 suggests it);
  (2) the random component initialization is seeded per stream (``init_state``'s seed) on the
  CPU generator, so it is reproducible and device-independent; (3) τ and α_init, hard-coded in
  the reference, are config fields with the reference values as defaults; (4) the assignment and
  the update follow the code (all K components updated, weighted by p), not the paper's
  "closest component" prose; (5) the components start from fixed, exactly balanced directions
  around the source statistics (``init="source_spread"``) instead of the official random draw,
  whose outcome moved by 3 to 10 points of accuracy between seeds (docs/results-notes.md);
  ``init="random"`` is the official behaviour.
- ``adapt=False``: the same prediction, the components are not updated.
- ``step_many``: one forward over every segment's images; each BN layer holds every segment's
  components stacked (S, K, C); a sample is assigned to and mixed with its own segment's
  components, and each segment's components move by its own momentum (from its batch size).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from adapters.base import Adapter, MethodConfig, Segment, StepInfo, StepResult, StreamState
from adapters.functional import (
    Tensors,
    cloned,
    forward,
    kept_on_device,
    on_device,
    qualified,
)
from adapters.layers import StreamBatchNorm, check_source_statistics, prepared_layers, swap_batchnorms
from adapters.moments import instance_var_mean
from adapters.norms import NormKind
from adapters.registry import register
from adapters.segments import FusedBatch, fused_or_stepped, per_sample, segment_sum, stacked, unstacked

MEANS = "unmix_means"
VARS = "unmix_vars"
HYPER = "unmix_hyper"
DEFAULT_BN_MOMENTUM = 0.1


def init_components(
    source_mean: torch.Tensor, source_var: torch.Tensor, k: int, alpha_init: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """K components whose uniform mixture has the source mean and variance in expectation.

    μ_k = μ_s + sqrt(α·K/(K−1))·σ_s·ε_k (ε ~ N(0, I), drawn on ``generator``), σ²_k = (1 − α)·σ²_s;
    K = 1 gives the source statistics exactly.
    """
    if k == 1:
        return source_mean.detach().clone()[None], source_var.detach().clone()[None]
    noise = torch.randn((k, source_mean.numel()), generator=generator, dtype=torch.float32)
    noise = noise.to(device=source_mean.device, dtype=source_mean.dtype)
    spread = math.sqrt(alpha_init * k / (k - 1))
    means = source_mean[None] + spread * source_var.sqrt()[None] * noise
    variances = ((1 - alpha_init) * source_var)[None].expand(k, -1).clone()
    return means.detach(), variances.detach()


SPREAD_DIRECTIONS_SEED = 0
"""Seed of the fixed direction draw of ``init="source_spread"``: the same for every stream and layer."""


def spread_components(
    source_mean: torch.Tensor, source_var: torch.Tensor, k: int, alpha_init: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """K components spread around the source along fixed, exactly balanced directions (no stream seed).

    Why: with the official random draw, which components sit where decides the result (the
    accuracy of a 2,000-image stream moves by several points between seeds). Here the directions
    d_k come from one constant-seeded draw, centred over k and scaled to unit RMS over k per
    channel, so μ_k = μ_s + sqrt(α)·σ_s·d_k and σ²_k = (1 − α)·σ²_s give a uniform mixture with
    exactly (not only in expectation) the source mean and variance, identical for every stream.
    K = 1 gives the source statistics exactly.
    """
    if k == 1:
        return source_mean.detach().clone()[None], source_var.detach().clone()[None]
    generator = torch.Generator(device="cpu").manual_seed(SPREAD_DIRECTIONS_SEED)
    directions = torch.randn((k, source_mean.numel()), generator=generator, dtype=torch.float64)
    directions = directions - directions.mean(dim=0, keepdim=True)
    directions = directions / directions.pow(2).mean(dim=0, keepdim=True).sqrt().clamp_min(1e-12)
    directions = directions.to(device=source_mean.device, dtype=source_mean.dtype)
    means = source_mean[None] + math.sqrt(alpha_init) * source_var.sqrt()[None] * directions
    variances = ((1 - alpha_init) * source_var)[None].expand(k, -1).clone()
    return means.detach(), variances.detach()


def source_components(source_mean: torch.Tensor, source_var: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K copies of the source statistics: deterministic, but the components never separate.

    Every sample is then assigned uniformly (equal cosines), so all K move identically: a
    one-component memory mixed 1/K with each instance. Offered as the degenerate baseline.
    """
    return (
        source_mean.detach().clone()[None].expand(k, -1).clone(),
        source_var.detach().clone()[None].expand(k, -1).clone(),
    )


def assignment(instance_mean: torch.Tensor, means: torch.Tensor, temperature: torch.Tensor | float) -> torch.Tensor:
    """p (B×K): softmax over components of cos(μ̃_b, μ_k)/τ, comparing means only (L2-normalized over C).

    ``means`` is K×C (one stream) or B×K×C (each sample's own stream's components).
    """
    unit = F.normalize(instance_mean, dim=1)
    if means.dim() == 3:
        sim = torch.bmm(F.normalize(means, dim=2), unit[:, :, None])[:, :, 0]
    else:
        sim = unit @ F.normalize(means, dim=1).T
    return F.softmax(sim / temperature, dim=1)


def _mix(weights: torch.Tensor, components: torch.Tensor) -> torch.Tensor:
    """Σ_k w_bk·c_k for one stream's components: B×K @ K×C."""
    return weights @ components


def mixed_statistics(
    p: torch.Tensor,
    instance_mean: torch.Tensor,
    instance_var: torch.Tensor,
    means: torch.Tensor,
    variances: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample statistics (B×C) from the per-component mixes (law of total variance over K).

    ``means``/``variances`` are K×C, or B×K×C with each sample's own stream's components.
    With m_bk = (1 − p_bk)·μ_k + p_bk·μ̃_b and v_bk = (1 − p_bk)·σ²_k + p_bk·σ̃²_b:
    mean_b = (1/K)·Σ_k m_bk and var_b = (1/K)·Σ_k v_bk + (1/K)·Σ_k m_bk² − mean_b². With one
    stream's K×C components each sum over k is expanded into B×K @ K×C products, so no B×K×C
    tensor is built (broadcasting the components to B×K×C cost more than the convolutions of a
    small CIFAR ResNet); per-sample components are B×K×C already (:func:`_mixed_per_sample`).
    """
    if means.dim() == 3:
        return _mixed_per_sample(p, instance_mean, instance_var, means, variances)
    k = means.shape[-2]
    q = 1 - p
    p_sum = p.sum(dim=1, keepdim=True)
    mean = (_mix(q, means) + p_sum * instance_mean) / k
    second = (
        _mix(q * q, means * means)
        + 2 * _mix(p * q, means) * instance_mean
        + (p * p).sum(1, keepdim=True) * (instance_mean * instance_mean)
    )
    var = (_mix(q, variances) + p_sum * instance_var) / k + second / k - mean * mean
    return mean, var.clamp_min(0.0)


def _mixed_per_sample(
    p: torch.Tensor,
    instance_mean: torch.Tensor,
    instance_var: torch.Tensor,
    means: torch.Tensor,
    variances: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`mixed_statistics` with each sample's own components (B×K×C): the mixes built directly.

    The components are per sample already, so the B×K×C mixes cost no more than the products
    that avoid them, and take a third of the operations (``lerp`` is m_bk in one pass); a fused
    step runs this for every BN layer.
    """
    weight = p[:, :, None]
    mixed_means = torch.lerp(means, instance_mean[:, None, :], weight)
    mixed_vars = torch.lerp(variances, instance_var[:, None, :], weight)
    mean = mixed_means.mean(1)
    var = mixed_vars.mean(1) + (mixed_means * mixed_means).mean(1) - mean * mean
    return mean, var.clamp_min(0.0)


def update_components(
    p: torch.Tensor,
    instance_mean: torch.Tensor,
    instance_var: torch.Tensor,
    means: torch.Tensor,
    variances: torch.Tensor,
    momentum: torch.Tensor | float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """μ_k += M·mean_b[p_bk(μ̃_b − μ_k)], σ²_k += M·mean_b[p_bk(σ̃²_b − σ²_k)], for every k."""
    batch = p.shape[0]
    weight = p.sum(dim=0)[:, None]
    new_means = means + momentum * (p.T @ instance_mean - weight * means) / batch
    new_vars = variances + momentum * (p.T @ instance_var - weight * variances) / batch
    return new_means, new_vars


def update_segment_components(
    p: torch.Tensor,
    instance_mean: torch.Tensor,
    instance_var: torch.Tensor,
    means: torch.Tensor,
    variances: torch.Tensor,
    momentum: torch.Tensor,
    index: torch.Tensor,
    sizes: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`update_components` for S streams at once: components S×K×C, momentum (S,), sums per segment.

    Σ_b p_bk·μ̃_b over a segment's samples is a segment sum of the B×K×C outer products
    (``index_add``: a broken segment cannot leak into the others).
    """
    count = len(sizes)
    if len(index) == count:  # one sample per segment: μ_k + M·p_k·(μ̃ − μ_k), a lerp per stream
        rate = (momentum / sizes.clamp_min(1.0))[:, None, None] * p[:, :, None]
        return torch.lerp(means, instance_mean[:, None, :], rate), torch.lerp(variances, instance_var[:, None, :], rate)
    weight = segment_sum(p, index, count)[:, :, None]
    mean_sum = segment_sum(p[:, :, None] * instance_mean[:, None, :], index, count)
    var_sum = segment_sum(p[:, :, None] * instance_var[:, None, :], index, count)
    rate = (momentum / sizes.clamp_min(1.0))[:, None, None]
    return means + rate * (mean_sum - weight * means), variances + rate * (var_sum - weight * variances)


def batch_momentum(
    base: torch.Tensor | float, batch: int, batch_size_max: torch.Tensor | float
) -> torch.Tensor | float:
    """M = 1 − (1 − m)^(B / B_max), from the actual batch size B of this call."""
    return 1 - (1 - base) ** (batch / batch_size_max)


class UnMixBatchNorm(StreamBatchNorm):
    """BN with K per-stream statistics components and per-instance mixed statistics.

    Per-call tensors: ``unmix_means`` and ``unmix_vars`` (K×C, updated in place: the caller
    passes clones) and ``unmix_hyper`` = [τ, base momentum m, batch_size_max]. Absent
    components -> the source layer. In a fused call the components are stacked per segment
    (S×K×C).
    """

    unmix_means: torch.Tensor | None
    unmix_vars: torch.Tensor | None
    unmix_hyper: torch.Tensor | None

    def __init__(self, source: _BatchNorm) -> None:
        super().__init__(source)
        self.register_buffer(MEANS, None)
        self.register_buffer(VARS, None)
        self.register_buffer(HYPER, None)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        means, variances, hyper = self.unmix_means, self.unmix_vars, self.unmix_hyper
        dims = self.instance_dims(input)
        if means is None or variances is None or hyper is None or not dims:
            return self.source_forward(input)
        if self.segment_index is not None:
            return self.segmented_forward(input, means, variances, hyper)
        instance_var, instance_mean = instance_var_mean(input)
        with torch.no_grad():
            p = assignment(instance_mean.detach(), means, hyper[0])
        mean, var = mixed_statistics(p, instance_mean, instance_var, means, variances)
        with torch.no_grad():
            momentum = batch_momentum(hyper[1], input.shape[0], hyper[2])
            new_means, new_vars = update_components(
                p, instance_mean.detach(), instance_var.detach(), means, variances, momentum
            )
            means.copy_(new_means)
            variances.copy_(new_vars)
        return self.normalize(input, mean, var)

    def segmented_forward(
        self, x: torch.Tensor, means: torch.Tensor, variances: torch.Tensor, hyper: torch.Tensor
    ) -> torch.Tensor:
        """Each sample mixed with its own segment's components (S×K×C), each segment's updated by its own momentum."""
        index, sizes = self.layout()
        instance_var, instance_mean = instance_var_mean(x)
        own_means, own_vars = per_sample(means, index), per_sample(variances, index)
        with torch.no_grad():
            p = assignment(instance_mean.detach(), own_means, hyper[0])
        mean, var = mixed_statistics(p, instance_mean, instance_var, own_means, own_vars)
        with torch.no_grad():
            momentum = 1 - (1 - hyper[1]) ** (sizes / hyper[2])
            new_means, new_vars = update_segment_components(
                p, instance_mean.detach(), instance_var.detach(), means, variances, momentum, index, sizes
            )
            means.copy_(new_means)
            variances.copy_(new_vars)
        return self.normalize_samples(x, mean, var)


class UnMixTNSConfig(MethodConfig):
    """Official defaults (CIFAR: K = 16, B_max = 64; use K = 128 for mixed-domain streams), except ``init``
    (``"random"`` is the official draw)."""

    legacy_values: ClassVar[dict[str, Any]] = {"init": "random"}  # every run before `init` existed

    num_components: int = Field(16, ge=1, le=512, description="K statistics components per BN layer")
    temperature: float = Field(0.07, gt=0.0, le=10.0, description="softmax temperature τ of the assignment")
    alpha_init: float = Field(0.5, ge=0.0, lt=1.0, description="share of source variance spread between components")
    batch_size_max: int = Field(64, ge=1, le=65536, description="B_max of the momentum correction")
    base_momentum: float | None = Field(
        None, ge=0.0, le=1.0, description="m of the momentum correction; None = each BN layer's own momentum"
    )
    init: Literal["random", "source_spread", "source"] = Field(
        "source_spread",
        description="component initialization: fixed balanced directions around the source (the default: "
        "seed-independent), the official seeded random draw (`random`), or K copies of the source",
    )


@register
class UnMixTNS(Adapter[UnMixTNSConfig]):
    """Per-instance normalization with statistics mixed from K per-stream components."""

    name = "unmix_tns"
    config_cls = UnMixTNSConfig
    supported_norms = frozenset({NormKind.BN})
    predicts = "after_update"
    batch_size_one = "works: components supply batch-like statistics; momentum scales with B (slow at B=1)"

    def check_model(self, model: nn.Module) -> None:
        super().check_model(model)
        check_source_statistics(model)

    def prepare(self, model: nn.Module) -> nn.Module:
        """A copy with BN layers swapped for :class:`UnMixBatchNorm` (input model untouched)."""
        return swap_batchnorms(model, UnMixBatchNorm)

    def _component_layers(self, model: nn.Module) -> list[tuple[str, UnMixBatchNorm]]:
        """Swapped layers that get components: all but BatchNorm1d, which has no instance statistics."""
        out: list[tuple[str, UnMixBatchNorm]] = []
        for name in prepared_layers(model, UnMixBatchNorm):
            layer = model.get_submodule(name) if name else model
            if isinstance(layer, UnMixBatchNorm) and not layer.replaces_1d:
                out.append((name, layer))
        return out

    def init_state(self, model: nn.Module, seed: int = 0, model_hash: str = "") -> StreamState:
        """Components for every adapted BN layer (``init="random"``: drawn in model order, seeded CPU generator)."""
        cfg = self.config
        generator = torch.Generator(device="cpu").manual_seed(seed)
        tensors: Tensors = {}
        for name, layer in self._component_layers(model):
            source_mean, source_var = layer.source_stats()
            if cfg.init == "source_spread":
                means, variances = spread_components(source_mean, source_var, cfg.num_components, cfg.alpha_init)
            elif cfg.init == "source":
                means, variances = source_components(source_mean, source_var, cfg.num_components)
            else:
                means, variances = init_components(
                    source_mean, source_var, cfg.num_components, cfg.alpha_init, generator
                )
            tensors[qualified(name, MEANS)] = means
            tensors[qualified(name, VARS)] = variances
        return StreamState(tensors, self.new_meta(seed, model_hash))

    @torch.no_grad()
    def step(self, model: nn.Module, x: torch.Tensor, state: StreamState, adapt: bool = True) -> StepResult:
        components = cloned(on_device(state.tensors, x.device))  # the layers update these in place
        logits = forward(model, {**components, **self._hyper(model, x.device)}, x)
        return self._result(logits, state, components, adapt)

    def step_many(self, model: nn.Module, segments: Sequence[Segment]) -> list[StepResult]:
        """One forward over all segments, each sample mixed with its own stream's components."""
        return fused_or_stepped(self, model, segments, self._fused)

    @torch.no_grad()
    def _fused(self, model: nn.Module, segments: Sequence[Segment]) -> list[StepResult]:
        batch = FusedBatch.of([seg.x for seg in segments])
        components = stacked([kept_on_device(seg.state.tensors, batch.x.device) for seg in segments])  # fresh
        names = [name for name, _ in self._component_layers(model)]
        call = {**components, **self._hyper(model, batch.x.device), **batch.per_layer(names)}
        logits = batch.split(forward(model, call, batch.x))
        rows = unstacked(components, batch.count)
        return [
            self._result(out, seg.state, own, seg.adapt) for out, seg, own in zip(logits, segments, rows, strict=True)
        ]

    def _hyper(self, model: nn.Module, device: torch.device) -> Tensors:
        """[τ, base momentum, batch_size_max] for every layer with components."""
        cfg = self.config
        call: Tensors = {}
        for name, layer in self._component_layers(model):
            base = cfg.base_momentum
            if base is None:
                base = layer.momentum if layer.momentum is not None else DEFAULT_BN_MOMENTUM
            call[qualified(name, HYPER)] = torch.tensor(
                [cfg.temperature, base, float(cfg.batch_size_max)], device=device
            )
        return call

    @staticmethod
    def _result(
        logits: torch.Tensor,
        state: StreamState,
        components: Mapping[str, torch.Tensor],
        adapt: bool,
    ) -> StepResult:
        samples = len(logits)
        info = StepInfo(adapted=adapt, samples=samples, samples_used=samples if adapt else 0)
        if not adapt:
            return StepResult(logits, state, info)
        return StepResult(logits, StreamState(components, state.meta).with_meta(step=state.meta.step + 1), info)

    def export_tensors(self, state: StreamState) -> tuple[int, dict[str, torch.Tensor]]:
        """Not loadable into a plain model (the components need :class:`UnMixBatchNorm`): empty."""
        return state.meta.step, {}
