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
    entropy,
    forward,
    grads_of,
    kept_on_device,
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
from adapters.segments import FusedBatch, row, segment_losses, segment_names, stacked, unstacked

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
    return stacked_affine_forward(model, batch, stacked(params), flags)


def stacked_affine_forward(
    model: nn.Module, batch: FusedBatch, params: Tensors, flags: Tensors
) -> tuple[torch.Tensor, Tensors]:
    """:func:`fused_affine_forward` with the segments' parameters already stacked (S, ...)."""
    live = {k: v.detach().requires_grad_(torch.is_grad_enabled()) for k, v in params.items()}
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


@dataclass
class _StackedOptimizer:
    """Every stream's parameters and moments of a fused call, stacked (S, ...), and their Adam step counts."""

    params: Tensors
    m1: Tensors
    m2: Tensors
    steps: list[int]

    @classmethod
    def of(cls, tensors: Tensors) -> _StackedOptimizer:
        count = len(next(iter(tensors.values())))
        steps = [int(v) for v in tensors[OPT_STEP].tolist()] if OPT_STEP in tensors else [0] * count
        return cls(unprefixed(PARAM, tensors), unprefixed(MOMENT1, tensors), unprefixed(MOMENT2, tensors), steps)

    def every_stream(self, streams: Sequence[int]) -> bool:
        """Whether ``streams`` are all the call's streams in order (their rows need no gathering)."""
        return list(streams) == list(range(len(self.steps)))

    def params_of(self, streams: Sequence[int]) -> Tensors:
        """The parameters of ``streams`` in that order (the stacked tensors themselves for all streams)."""
        return _take(self.params, streams, self.every_stream(streams))


def _take(tensors: Tensors, rows: Sequence[int], whole: bool = False) -> Tensors:
    """Rows ``rows`` of every stacked tensor (a copy), or the tensors themselves when ``whole``."""
    if whole:
        return tensors
    index = torch.tensor(list(rows), device=next(iter(tensors.values())).device)
    return {k: v.index_select(0, index) for k, v in tensors.items()}


def _put(tensors: Tensors, rows: Sequence[int], values: Tensors, whole: bool = False) -> Tensors:
    """``tensors`` with rows ``rows`` replaced by ``values`` (new tensors: the old ones may be in a graph),
    or ``values`` themselves when they are ``whole``."""
    if whole:
        return values
    index = torch.tensor(list(rows), device=next(iter(tensors.values())).device)
    return {k: v.index_copy(0, index, values[k]) for k, v in tensors.items()}


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
            info = StepInfo(adapted=False, samples=len(x), samples_used=0)
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
        """Every stream's parameters and moments stacked (S, ...) for the whole call, never split per tensor."""
        cfg = self.config
        device = segments[0].x.device
        states = [self.reset(model, seg.state) if seg.adapt and cfg.episodic else seg.state for seg in segments]
        opt = _StackedOptimizer.of(stacked([kept_on_device(state.tensors, device) for state in states]))
        flags = batch_stats_flags(model)
        adapting = [i for i, seg in enumerate(segments) if seg.adapt]
        first: list[torch.Tensor] = []
        for k in range(cfg.steps):
            members = list(range(len(segments))) if k == 0 else adapting
            batch = FusedBatch.of([segments[i].x for i in members])
            with torch.set_grad_enabled(bool(adapting)):
                logits, live = stacked_affine_forward(model, batch, opt.params_of(members), flags)
            if k == 0:
                first = batch.split(logits.detach())
            rows = [j for j, i in enumerate(members) if segments[i].adapt]
            if not rows:
                break
            losses = [part.mean() for part in segment_losses(entropy(logits), batch.lengths)]
            grads = grads_of(torch.stack([losses[j] for j in rows]).sum(), live)
            self._update_stacked(opt, grads, rows, [members[j] for j in rows])
        own = unstacked(self._state_tensors(opt, device), len(segments)) if adapting else []
        results = []
        for i, (seg, state, logits) in enumerate(zip(segments, states, first, strict=True)):
            if seg.adapt:
                info = StepInfo(True, len(logits), len(logits), forwards=cfg.steps, backwards=cfg.steps)
                new_state = StreamState(own[i], state.meta).with_meta(step=state.meta.step + 1)
                results.append(StepResult(logits, new_state, info))
            else:
                results.append(StepResult(logits, state, StepInfo(False, len(logits), 0)))
        return results

    def _state_tensors(self, opt: _StackedOptimizer, device: torch.device) -> Tensors:
        """The stacked state tensors (S, ...) under the state's names, in the order ``init_state`` gives them."""
        tensors = {**prefixed(PARAM, opt.params), **prefixed(MOMENT1, opt.m1)}
        if self.config.optimizer == "adam":
            tensors.update(prefixed(MOMENT2, opt.m2))
            tensors[OPT_STEP] = torch.tensor(opt.steps, dtype=torch.int64, device=device)
        return tensors

    def _optimizer(self, tensors: Tensors) -> _Optimizer:
        """A stream's parameters and moments from its state tensors."""
        m1, m2 = unprefixed(MOMENT1, tensors), unprefixed(MOMENT2, tensors)
        opt_step = int(tensors[OPT_STEP]) if OPT_STEP in tensors else 0
        return _Optimizer(unprefixed(PARAM, tensors), m1, m2, opt_step)

    def _update_stacked(
        self, opt: _StackedOptimizer, grads: Tensors, rows: Sequence[int], streams: Sequence[int]
    ) -> None:
        """Optimizer steps of streams ``streams[j]``, whose gradients are row ``rows[j]`` of ``grads``.

        The optimizers are elementwise, so streams at the same Adam step count are updated in one
        call on their stacked rows: the same arithmetic per element as one call per stream.
        """
        cfg = self.config
        groups: dict[int, list[int]] = {}
        for j, stream in enumerate(streams):
            groups.setdefault(opt.steps[stream], []).append(j)
        for step, members in groups.items():
            picked = [streams[j] for j in members]
            whole = opt.every_stream(picked)
            g = grads if whole and list(rows) == picked else _take(grads, [rows[j] for j in members])
            params, m1 = _take(opt.params, picked, whole), _take(opt.m1, picked, whole)
            if cfg.optimizer == "adam":
                betas = (cfg.beta1, cfg.beta2)
                m2 = _take(opt.m2, picked, whole)
                params, m1, m2 = adam_step(params, g, m1, m2, step + 1, cfg.lr, betas, weight_decay=cfg.weight_decay)
                opt.m2 = _put(opt.m2, picked, m2, whole)
                for stream in picked:
                    opt.steps[stream] = step + 1
            else:
                params, m1 = sgd_step(params, g, m1, cfg.lr, cfg.momentum, cfg.weight_decay)
            opt.params, opt.m1 = _put(opt.params, picked, params, whole), _put(opt.m1, picked, m1, whole)

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
        )
        return StepResult(first, StreamState(new, state.meta).with_meta(step=state.meta.step + 1), info)

    def export_tensors(self, state: StreamState) -> tuple[int, dict[str, torch.Tensor]]:
        """The adapted norm affine parameters under the model's names; version = adaptation step."""
        return state.meta.step, unprefixed(PARAM, state.tensors)
