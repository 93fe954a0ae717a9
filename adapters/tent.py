"""``tent``: entropy minimization of the norm affine parameters (Wang et al., ICLR 2021).

Per batch: forward, loss = mean prediction entropy, one optimizer step on the weight and bias of
every norm layer; BN layers normalize with the batch's statistics.

- Prediction: *before* the update (the logits of the forward whose entropy is minimized), as in
  the reference code; re-forwarding after the update does not matter per the authors (tent #3).
- Batch size 1: GN/LN models are fine. BN models run but normalize a single image with its own
  spatial statistics (instance normalization), which adapts poorly; BN1d layers keep source
  statistics at B = 1.
- Norms: BN, GN, LN (the reference adapts BN only; GN/LN follow the benchmark library).
- State: the adapted affine parameters and the optimizer moments (Adam or SGD momentum), as pure
  functional optimizers whose moments are state tensors.
- ``prepare`` returns a copy with BN layers swapped for :class:`adapters.layers.BatchStatsNorm`
  (GN/LN models are only frozen).
- Deviations: ``episodic`` resets to source before every batch by starting from the source
  state, which is what the reference's snapshot restore does; no other change.
- ``adapt=False``: one forward, same prediction, no backward, state unchanged.
- ``step_many``: every optimization step is one fused forward and one backward over the
  segments that still step (all of them, dry runs included, in the first): each segment's
  affine parameters are stacked (S, C) and gathered per sample, BN layers use each segment's
  batch statistics, and the loss is the sum of the segments' mean entropies, whose gradient
  with respect to segment s's row is exactly that segment's own gradient. The optimizer update
  then runs per segment (each stream has its own Adam step count).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from adapters.base import Adapter, MethodConfig, Segment, StepInfo, StepResult, StreamState
from adapters.functional import (
    Tensors,
    adam_step,
    drift_extra,
    entropy,
    forward,
    grads_of,
    model_device,
    norm_affine,
    on_device,
    per_layer,
    prefixed,
    requiring_grad,
    sgd_step,
    unprefixed,
    zeros_like_all,
)
from adapters.layers import (
    BatchStatsNorm,
    fused_with_segment_affine,
    prepared_layers,
    segment_layers,
    swap_affine_norms,
    swap_batchnorms,
)
from adapters.norms import NormKind
from adapters.registry import register
from adapters.segments import FusedBatch, row, segment_losses, segment_names, stacked

PARAM = "affine/"
MOMENT1 = "opt_m/"
MOMENT2 = "opt_v/"
OPT_STEP = "opt_step"


class TentConfig(MethodConfig):
    """Tent's CIFAR defaults (Adam, lr 1e-3); ImageNet used SGD lr 2.5e-4 with momentum 0.9."""

    optimizer: Literal["adam", "sgd"] = "adam"
    lr: float = Field(1e-3, gt=0.0, le=1.0)
    beta1: float = Field(0.9, ge=0.0, lt=1.0, description="Adam beta1")
    beta2: float = Field(0.999, ge=0.0, lt=1.0, description="Adam beta2")
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="SGD momentum")
    weight_decay: float = Field(0.0, ge=0.0, le=1.0)
    steps: int = Field(1, ge=1, le=10, description="optimization steps per batch")
    episodic: bool = False


def trainable_affine(model: nn.Module) -> Tensors:
    """The norm affine parameters every gradient method in this package adapts (found by type)."""
    return norm_affine(model)


def batch_stats_flags(model: nn.Module) -> Tensors:
    """Per-call tensors that switch every swapped BN layer of ``model`` to batch statistics."""
    flag = torch.ones((), device=model_device(model))
    return per_layer(prepared_layers(model, BatchStatsNorm), "batch_stats", flag)


def fused_affine_forward(
    model: nn.Module, batch: FusedBatch, params: Sequence[Tensors], flags: Tensors
) -> tuple[torch.Tensor, Tensors]:
    """One forward over ``batch`` with each segment's own affine ``params``; returns (logits, stacked leaves).

    The stacked leaves (S, ...) require grad when gradients are enabled, so one backward of a
    sum of per-segment losses yields every segment's own gradient in its row.
    """
    live = {k: v.requires_grad_(torch.is_grad_enabled()) for k, v in stacked(params).items()}
    call = {**flags, **segment_names(live), **batch.per_layer(segment_layers(model))}
    return forward(model, call, batch.x), live


def segment_grads(loss: torch.Tensor, live: Tensors, count: int) -> list[Tensors]:
    """Each segment's gradient of the summed loss w.r.t. its own row of the stacked ``live`` tensors."""
    grads = grads_of(loss, live)
    return [row(grads, i) for i in range(count)]


@dataclass
class _Optimizer:
    """One stream's parameters and optimizer moments between the steps of a fused call."""

    params: Tensors
    m1: Tensors
    m2: Tensors
    opt_step: int


@register
class Tent(Adapter[TentConfig]):
    """Minimize prediction entropy w.r.t. the norm affine parameters, one batch at a time."""

    name = "tent"
    config_cls = TentConfig
    supported_norms = frozenset(NormKind)
    predicts = "before_update"
    batch_size_one = "GN/LN: fine; BN: runs as instance normalization (poor)"

    def prepare(self, model: nn.Module) -> nn.Module:
        """A copy with BN layers swapped for batch-statistics layers, GN/LN for segment-aware twins."""
        return swap_affine_norms(swap_batchnorms(model, BatchStatsNorm))

    def init_state(self, model: nn.Module, seed: int = 0, model_hash: str = "") -> StreamState:
        params = trainable_affine(model)
        tensors = {**prefixed(PARAM, params), **prefixed(MOMENT1, zeros_like_all(params))}
        if self.config.optimizer == "adam":
            tensors.update(prefixed(MOMENT2, zeros_like_all(params)))
            tensors[OPT_STEP] = torch.zeros((), dtype=torch.int64, device=model_device(model))
        return StreamState(tensors, self.new_meta(seed, model_hash))

    def step(self, model: nn.Module, x: torch.Tensor, state: StreamState, adapt: bool = True) -> StepResult:
        cfg = self.config
        if adapt and cfg.episodic:
            state = self.reset(model, state)
        tensors = on_device(state.tensors, x.device)
        flags = batch_stats_flags(model)
        params = unprefixed(PARAM, tensors)
        if not adapt:
            with torch.no_grad():
                logits = forward(model, {**flags, **params}, x)
            info = StepInfo(adapted=False, samples=len(x), samples_used=0, extra=drift_extra(logits))
            return StepResult(logits, state, info)

        opt = self._optimizer(tensors)
        first: torch.Tensor | None = None
        for _ in range(cfg.steps):
            live = requiring_grad(opt.params)
            logits = forward(model, {**flags, **live}, x)
            if first is None:
                first = logits.detach()
            self._update(opt, grads_of(entropy(logits).mean(), live))
        if first is None:
            raise RuntimeError("steps must be at least 1")
        return self._adapted(first, state, opt)

    def step_many(self, model: nn.Module, segments: Sequence[Segment]) -> list[StepResult]:
        """Fused forwards and backwards over all segments (per-segment optimizer updates)."""
        return fused_with_segment_affine(self, model, segments, self._fused, PARAM)

    def _fused(self, model: nn.Module, segments: Sequence[Segment]) -> list[StepResult]:
        cfg = self.config
        device = segments[0].x.device
        states = [self.reset(model, seg.state) if seg.adapt and cfg.episodic else seg.state for seg in segments]
        opts = [self._optimizer(on_device(state.tensors, device)) for state in states]
        flags = batch_stats_flags(model)
        adapting = [i for i, seg in enumerate(segments) if seg.adapt]
        first: list[torch.Tensor] = []
        for k in range(cfg.steps):
            members = list(range(len(segments))) if k == 0 else adapting
            batch = FusedBatch.of([segments[i].x for i in members])
            with torch.set_grad_enabled(bool(adapting)):
                logits, live = fused_affine_forward(model, batch, [opts[i].params for i in members], flags)
            if k == 0:
                first = batch.split(logits.detach())
            losses = [part.mean() for part in segment_losses(entropy(logits), batch.lengths)] if adapting else []
            rows = [j for j, i in enumerate(members) if segments[i].adapt]
            if not rows:
                break
            grads = grads_of(torch.stack([losses[j] for j in rows]).sum(), live)
            self._update_rows([opts[members[j]] for j in rows], grads, rows)
        results = []
        for seg, state, opt, logits in zip(segments, states, opts, first, strict=True):
            if seg.adapt:
                results.append(self._adapted(logits, state, opt))
            else:
                info = StepInfo(adapted=False, samples=len(logits), samples_used=0, extra=drift_extra(logits))
                results.append(StepResult(logits, state, info))
        return results

    def _optimizer(self, tensors: Tensors) -> _Optimizer:
        """A stream's parameters and moments from its state tensors."""
        m1, m2 = unprefixed(MOMENT1, tensors), unprefixed(MOMENT2, tensors)
        opt_step = int(tensors[OPT_STEP]) if OPT_STEP in tensors else 0
        return _Optimizer(unprefixed(PARAM, tensors), m1, m2, opt_step)

    def _update_rows(self, opts: Sequence[_Optimizer], grads: Tensors, rows: Sequence[int]) -> None:
        """Optimizer steps of several streams, ``grads`` stacked with stream ``opts[j]`` in row ``rows[j]``.

        The optimizers are elementwise, so streams at the same Adam step count are updated in one
        call on stacked tensors (the same arithmetic per element as one call per stream, without
        its per-tensor overhead repeated for every stream).
        """
        groups: dict[int, list[int]] = {}
        for j, opt in enumerate(opts):
            groups.setdefault(opt.opt_step, []).append(j)
        for members in groups.values():
            pick = torch.tensor([rows[j] for j in members], device=next(iter(grads.values())).device)
            picked = {k: g.index_select(0, pick) for k, g in grads.items()}
            self._update_group([opts[j] for j in members], picked)

    def _update_group(self, opts: Sequence[_Optimizer], grads: Tensors) -> None:
        """One optimizer step of streams at the same step count, on their stacked tensors."""
        cfg = self.config
        params, m1 = stacked([o.params for o in opts]), stacked([o.m1 for o in opts])
        m2 = stacked([o.m2 for o in opts]) if cfg.optimizer == "adam" else {}
        opt_step = opts[0].opt_step + (cfg.optimizer == "adam")
        if cfg.optimizer == "adam":
            betas = (cfg.beta1, cfg.beta2)
            params, m1, m2 = adam_step(params, grads, m1, m2, opt_step, cfg.lr, betas, weight_decay=cfg.weight_decay)
        else:
            params, m1 = sgd_step(params, grads, m1, cfg.lr, cfg.momentum, cfg.weight_decay)
        for j, opt in enumerate(opts):
            opt.params, opt.m1, opt.m2, opt.opt_step = row(params, j), row(m1, j), row(m2, j), opt_step

    def _update(self, opt: _Optimizer, grads: Tensors) -> None:
        """One optimizer step of one stream, in place on its :class:`_Optimizer` record."""
        cfg = self.config
        if cfg.optimizer == "adam":
            opt.opt_step += 1
            opt.params, opt.m1, opt.m2 = adam_step(
                opt.params,
                grads,
                opt.m1,
                opt.m2,
                opt.opt_step,
                cfg.lr,
                (cfg.beta1, cfg.beta2),
                weight_decay=cfg.weight_decay,
            )
        else:
            opt.params, opt.m1 = sgd_step(opt.params, grads, opt.m1, cfg.lr, cfg.momentum, cfg.weight_decay)

    def _adapted(self, first: torch.Tensor, state: StreamState, opt: _Optimizer) -> StepResult:
        """The result of an adapting step: the first forward's logits and the updated state."""
        cfg = self.config
        new = {**prefixed(PARAM, opt.params), **prefixed(MOMENT1, opt.m1)}
        if cfg.optimizer == "adam":
            new.update(prefixed(MOMENT2, opt.m2))
            new[OPT_STEP] = torch.tensor(opt.opt_step, dtype=torch.int64, device=first.device)
        info = StepInfo(
            adapted=True,
            samples=len(first),
            samples_used=len(first),
            forwards=cfg.steps,
            backwards=cfg.steps,
            extra=drift_extra(first),
        )
        return StepResult(first, StreamState(new, state.meta).with_meta(step=state.meta.step + 1), info)

    def export_tensors(self, state: StreamState) -> tuple[int, dict[str, torch.Tensor]]:
        """The adapted norm affine parameters under the model's names; version = adaptation step."""
        return state.meta.step, unprefixed(PARAM, state.tensors)
