"""``sar``: Sharpness-Aware and Reliable entropy minimization (Niu et al., ICLR 2023).

Per batch (tta-methods.md §3.2): forward; keep the reliable samples S1 (entropy < E0 = e0·ln C);
SAM ascent along the gradient of their mean entropy (radius ρ, global L2 norm); forward again at
the perturbed parameters; keep S2 ⊂ S1 still below E0; SGD-momentum descent at the original
parameters with the perturbed gradient; track an EMA of the second loss and reset to the source
when it falls below e_m (entropy collapse).

- Prediction: *before* the update (the logits of the first forward).
- Batch size 1: the method's target setting on GN/LN models (SAR's bs1 experiments double the
  lr: set ``lr`` accordingly, it is not scaled automatically). BN models run but normalize a single
  image with its own statistics (poor); BN1d layers keep source statistics at B = 1.
- Norms: BN (batch statistics), GN, LN; affine parameters of all norm layers except the top stage.
- State: trainable affine parameters, SGD momentum buffers, the loss EMA (NaN = none yet). The
  reset snapshot is the shared source model itself, so it costs no per-stream memory.
- ``prepare`` returns a copy with BN layers swapped for :class:`adapters.layers.BatchStatsNorm`.
- Deviations from the official code, all deliberate:
  1. The EMA is cleared on model recovery (SAR issue #4: the reference re-assigns it after reset).
  2. No update at all when S1 or S2 is empty (the reference still applies the SGD momentum,
     so parameters keep drifting with no reliable sample).
  3. The frozen top stage is found structurally, not by names (``layer4``, ``blocks.9-11``,
     ``norm``): descend from the root while one child holds more than half of the norm layers,
     then freeze the last child container holding norm layers and every norm layer after it
     (ResNets: the last stage, as the reference; ViT: the last block and the final norm, where
     the reference freezes three blocks). ``freeze="fraction"`` freezes the last
     ``freeze_fraction`` of norm layers in module order instead; ``"none"`` trains all.
  4. The reset threshold e_m is relative to ln C like E0 (default 0.029·ln C = 0.2 nats at
     C = 1000, the reference's hard-coded value), so it transfers to small C.
- ``StepInfo.adapted`` is False when a filter left no sample (the step changed nothing but the
  step counter).
- ``adapt=False``: one forward, same prediction, no backward, state unchanged.
- ``step_many``: both passes fused. Pass 1 is one forward over every segment (dry runs
  included) with each segment's affine stacked (S, C) and gathered per sample, and one backward
  of the sum of the segments' reliable-sample mean entropies (each row of the stacked gradient
  is that segment's own gradient). The SAM ascent (one global gradient norm per segment), the
  S1/S2 filters, the SGD step, the loss EMA and the model recovery run per segment outside the
  model. Pass 2 is one forward and one backward over the segments whose S1 is not empty, each at
  its own perturbed parameters.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from adapters.base import Adapter, MethodConfig, Segment, StepInfo, StepResult, StreamState
from adapters.functional import (
    Tensors,
    entropy,
    entropy_margin,
    forward,
    grads_of,
    norm_affine,
    on_device,
    prefixed,
    qualified,
    requiring_grad,
    sgd_step,
    unprefixed,
    zeros_like_all,
)
from adapters.layers import (
    BatchStatsNorm,
    fused_with_segment_affine,
    swap_affine_norms,
    swap_batchnorms,
)
from adapters.norms import NormKind, norm_kind_of, norm_layers
from adapters.registry import register
from adapters.segments import FusedBatch, segment_losses
from adapters.tent import batch_stats_flags, fused_affine_forward, segment_grads

PARAM = "affine/"
MOMENTUM = "momentum/"
EMA = "ema"


def _norm_count(module: nn.Module) -> int:
    return sum(1 for _ in norm_layers(module))


def top_stage_norms(model: nn.Module) -> set[str]:
    """Qualified names of the norm layers of the model's top (last) stage, found from the module tree.

    Descend from the root while a single child holds more than half of the norm layers (wrappers,
    a ``blocks`` sequence); at that level the *stages* are the child containers holding norm
    layers. Freeze the last one and every norm layer that follows it in module order. Returns an
    empty set when that level has no container child (a flat model has no stages).
    """
    prefix = ""
    node = model
    while True:
        total = _norm_count(node)
        holders = [(n, c) for n, c in node.named_children() if _norm_count(c) > 0]
        big = [(n, c) for n, c in holders if norm_kind_of(c) is None and 2 * _norm_count(c) > total]
        if len(big) != 1:
            break
        name, node = big[0]
        prefix = qualified(prefix, name)
    stages = [n for n, c in holders if norm_kind_of(c) is None]
    if not stages:
        return set()
    last = qualified(prefix, stages[-1])
    names = [n for n, _ in norm_layers(model)]
    first = next(i for i, n in enumerate(names) if n == last or n.startswith(last + "."))
    return set(names[first:])


def frozen_norms(model: nn.Module, freeze: str, fraction: float) -> set[str]:
    """The norm layers SAR does not adapt, by ``freeze`` rule; always leaves at least one trainable."""
    names = [n for n, _ in norm_layers(model)]
    if freeze == "none" or not names:
        return set()
    if freeze == "last_stage":
        frozen = top_stage_norms(model)
        if frozen and len(frozen) < len(names):
            return frozen
    count = min(math.floor(fraction * len(names)), len(names) - 1)
    return set(names[len(names) - count :]) if count > 0 else set()


def sam_perturbation(grads: Tensors, rho: float, order: Sequence[str] | None = None) -> Tensors:
    """SAM's ascent step ε = ρ·g / (‖g‖₂ + 1e-12), with one global L2 norm over all tensors.

    The per-tensor norms are summed in ``order`` (every name of ``grads``; default: the dict's own
    order). A float sum depends on its order, and a state's tensors do not always come in the
    same one (a state read back from bytes comes in the reader's order), so the adapter passes the
    model's parameter order: a restored or replicated stream then rounds exactly as the original.
    """
    names = grads.keys() if order is None else order
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(grads[k]) for k in names]))
    scale = rho / (norm + 1e-12)
    return {k: g * scale for k, g in grads.items()}


def ema_update(ema: float, loss: float, factor: float) -> float:
    """EMA of the second-pass loss; NaN means no value yet (then the loss itself)."""
    return loss if math.isnan(ema) else factor * ema + (1 - factor) * loss


class SARConfig(MethodConfig):
    """Official defaults (ResNet-50, B = 64); thresholds are fractions of ln C."""

    lr: float = Field(0.00025, gt=0.0, le=1.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.0, ge=0.0, le=1.0)
    rho: float = Field(0.05, ge=0.0, le=10.0, description="SAM radius")
    margin_e0: float = Field(0.4, gt=0.0, le=1.0, description="reliable if entropy < margin_e0 * ln C")
    reset_margin: float = Field(0.029, ge=0.0, le=1.0, description="reset when loss EMA < reset_margin * ln C")
    ema_factor: float = Field(0.9, ge=0.0, lt=1.0)
    freeze: Literal["last_stage", "fraction", "none"] = "last_stage"
    freeze_fraction: float = Field(0.25, ge=0.0, le=1.0, description="share of norm layers frozen by 'fraction'")


@register
class SAR(Adapter[SARConfig]):
    """Reliable, sharpness-aware entropy minimization with model recovery."""

    name = "sar"
    config_cls = SARConfig
    supported_norms = frozenset(NormKind)
    predicts = "before_update"
    batch_size_one = "GN/LN: the intended setting (double lr as the reference); BN: instance normalization (poor)"
    nan_markers = frozenset({EMA})

    def __init__(self, config: SARConfig | Mapping[str, Any] | None = None) -> None:
        super().__init__(config)
        self._param_orders: weakref.WeakKeyDictionary[nn.Module, tuple[str, ...]] = weakref.WeakKeyDictionary()

    def prepare(self, model: nn.Module) -> nn.Module:
        """A copy with BN layers swapped for batch-statistics layers, GN/LN for segment-aware twins."""
        return swap_affine_norms(swap_batchnorms(model, BatchStatsNorm))

    def param_order(self, model: nn.Module) -> tuple[str, ...]:
        """The trainable parameters' names in the model's module order (the reference's parameter order),
        found once per prepared model: the order the SAM norm sums in, whatever order a state comes in."""
        if model not in self._param_orders:
            self._param_orders[model] = tuple(self.source_params(model))
        return self._param_orders[model]

    def source_params(self, model: nn.Module) -> Tensors:
        """The trainable affine parameters at the source: all norm layers minus the frozen top stage."""
        frozen = frozen_norms(model, self.config.freeze, self.config.freeze_fraction)
        return {k: v for k, v in norm_affine(model).items() if k.rpartition(".")[0] not in frozen}

    def init_state(self, model: nn.Module, seed: int = 0, model_hash: str = "") -> StreamState:
        params = self.source_params(model)
        device = next(iter(params.values())).device if params else torch.device("cpu")
        tensors = {
            **prefixed(PARAM, params),
            **prefixed(MOMENTUM, zeros_like_all(params)),
            EMA: torch.tensor(math.nan, dtype=torch.float64, device=device),
        }
        return StreamState(tensors, self.new_meta(seed, model_hash))

    def step(self, model: nn.Module, x: torch.Tensor, state: StreamState, adapt: bool = True) -> StepResult:
        cfg = self.config
        tensors = on_device(state.tensors, x.device)
        flags = batch_stats_flags(model)
        params = unprefixed(PARAM, tensors)
        samples = len(x)
        if not adapt:
            with torch.no_grad():
                logits = forward(model, {**flags, **params}, x)
            return StepResult(logits, state, StepInfo(False, samples, 0))

        # pass 1: prediction + reliable samples S1
        live = requiring_grad(params)
        logits = forward(model, {**flags, **live}, x)
        prediction = logits.detach()
        e0 = entropy_margin(cfg.margin_e0, logits.shape[1])
        ent = entropy(logits)
        s1 = ent.detach() < e0
        extra = {"reliable": float(s1.sum())}
        if not bool(s1.any()):
            return self._unchanged(prediction, state, extra, passes=1)
        grads = grads_of(ent[s1].mean(), live)

        # SAM ascent, pass 2 at the perturbed point, S2 within S1
        eps = sam_perturbation(grads, cfg.rho, self.param_order(model))
        perturbed = requiring_grad({k: params[k] + eps[k] for k in params})
        ent2 = entropy(forward(model, {**flags, **perturbed}, x))[s1]
        s2 = ent2.detach() < e0
        if not bool(s2.any()):
            return self._unchanged(prediction, state, extra, passes=2)
        loss2 = ent2[s2].mean()
        grads2 = grads_of(loss2, perturbed)
        return self._descend(model, prediction, state, tensors, grads2, float(loss2.detach()), int(s2.sum()), extra)

    def step_many(self, model: nn.Module, segments: Sequence[Segment]) -> list[StepResult]:
        """Both SAR passes fused over the segments; filters, SAM norms and updates per segment."""
        return fused_with_segment_affine(self, model, segments, self._fused, PARAM)

    def _fused(self, model: nn.Module, segments: Sequence[Segment]) -> list[StepResult]:
        cfg = self.config
        batch = FusedBatch.of([seg.x for seg in segments])
        tensors = [on_device(seg.state.tensors, batch.x.device) for seg in segments]
        params = [unprefixed(PARAM, t) for t in tensors]
        flags = batch_stats_flags(model)
        with torch.set_grad_enabled(any(seg.adapt for seg in segments)):
            logits, live = fused_affine_forward(model, batch, params, flags)
        predictions = batch.split(logits.detach())
        results: list[StepResult | None] = [None] * len(segments)
        for i, seg in enumerate(segments):
            if not seg.adapt:
                info = StepInfo(False, len(seg.x), 0)
                results[i] = StepResult(predictions[i], seg.state, info)
        e0 = entropy_margin(cfg.margin_e0, logits.shape[1])
        ents = segment_losses(entropy(logits), batch.lengths)
        s1 = [e.detach() < e0 for e in ents]
        extras = [{"reliable": float(m.sum())} for m in s1]
        first: list[int] = []
        for i, seg in enumerate(segments):
            if seg.adapt and bool(s1[i].any()):
                first.append(i)
            elif seg.adapt:
                results[i] = self._unchanged(predictions[i], seg.state, extras[i], passes=1)
        if first:
            grads = segment_grads(torch.stack([ents[i][s1[i]].mean() for i in first]).sum(), live, batch.count)
            perturbed = []
            for i in first:
                eps = sam_perturbation(grads[i], cfg.rho, self.param_order(model))
                perturbed.append({k: params[i][k] + eps[k] for k in params[i]})
            batch2 = FusedBatch.of([segments[i].x for i in first])
            logits2, live2 = fused_affine_forward(model, batch2, perturbed, flags)
            ents2 = [e[s1[i]] for e, i in zip(segment_losses(entropy(logits2), batch2.lengths), first, strict=True)]
            s2 = [e.detach() < e0 for e in ents2]
            second = [j for j, m in enumerate(s2) if bool(m.any())]
            for j, i in enumerate(first):
                if j not in second:
                    results[i] = self._unchanged(predictions[i], segments[i].state, extras[i], passes=2)
            if second:
                losses2 = [ents2[j][s2[j]].mean() for j in second]
                grads2 = segment_grads(torch.stack(losses2).sum(), live2, batch2.count)
                for j, loss2 in zip(second, losses2, strict=True):
                    i = first[j]
                    results[i] = self._descend(
                        model,
                        predictions[i],
                        segments[i].state,
                        tensors[i],
                        grads2[j],
                        float(loss2.detach()),
                        int(s2[j].sum()),
                        extras[i],
                    )
        return [r for r in results if r is not None]

    @staticmethod
    def _unchanged(prediction: torch.Tensor, state: StreamState, extra: dict[str, float], passes: int) -> StepResult:
        """No update: no sample reliable after pass 1 (``passes=1``) or pass 2; only the step counter moves."""
        samples = len(prediction)
        info = StepInfo(False, samples, 0, forwards=passes, backwards=passes - 1, samples_filtered=samples, extra=extra)
        return StepResult(prediction, state.with_meta(step=state.meta.step + 1), info)

    def _descend(
        self,
        model: nn.Module,
        prediction: torch.Tensor,
        state: StreamState,
        tensors: Tensors,
        grads2: Tensors,
        loss2: float,
        used: int,
        extra: dict[str, float],
    ) -> StepResult:
        """SAM descent (SGD at the original parameters with the perturbed gradient), loss EMA, recovery."""
        cfg = self.config
        samples = len(prediction)
        ema = ema_update(float(tensors[EMA]), loss2, cfg.ema_factor)
        new_params, new_mom = sgd_step(
            unprefixed(PARAM, tensors), grads2, unprefixed(MOMENTUM, tensors), cfg.lr, cfg.momentum, cfg.weight_decay
        )
        resets = 0
        if ema < entropy_margin(cfg.reset_margin, prediction.shape[1]):
            fresh = self.init_state(model, state.meta.seed, state.meta.model_hash)
            new_params, new_mom = unprefixed(PARAM, fresh.tensors), unprefixed(MOMENTUM, fresh.tensors)
            ema, resets = math.nan, 1
        new = {
            **prefixed(PARAM, new_params),
            **prefixed(MOMENTUM, new_mom),
            EMA: torch.tensor(ema, dtype=torch.float64, device=prediction.device),
        }
        extra = dict(extra)
        if not math.isnan(ema):
            extra["loss_ema"] = ema
        info = StepInfo(
            True, samples, used, resets=resets, forwards=2, backwards=2, samples_filtered=samples - used, extra=extra
        )
        return StepResult(prediction, StreamState(new, state.meta).with_meta(step=state.meta.step + 1), info)

    def export_tensors(self, state: StreamState) -> tuple[int, dict[str, torch.Tensor]]:
        """The adapted norm affine parameters under the model's names; version = adaptation step."""
        return state.meta.step, unprefixed(PARAM, state.tensors)
