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
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from adapters.base import Adapter, MethodConfig, StepInfo, StepResult, StreamState
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
from adapters.layers import BatchStatsNorm, prepared_layers, swap_batchnorms
from adapters.norms import NormKind
from adapters.registry import register

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


@register
class Tent(Adapter[TentConfig]):
    """Minimize prediction entropy w.r.t. the norm affine parameters, one batch at a time."""

    name = "tent"
    config_cls = TentConfig
    supported_norms = frozenset(NormKind)
    predicts = "before_update"
    batch_size_one = "GN/LN: fine; BN: runs as instance normalization (poor)"

    def prepare(self, model: nn.Module) -> nn.Module:
        """A copy with BN layers swapped for batch-statistics layers (input model untouched)."""
        return swap_batchnorms(model, BatchStatsNorm)

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

        m1, m2 = unprefixed(MOMENT1, tensors), unprefixed(MOMENT2, tensors)
        opt_step = int(tensors[OPT_STEP]) if OPT_STEP in tensors else 0
        first: torch.Tensor | None = None
        for _ in range(cfg.steps):
            live = requiring_grad(params)
            logits = forward(model, {**flags, **live}, x)
            if first is None:
                first = logits.detach()
            loss = entropy(logits).mean()
            grads = grads_of(loss, live)
            if cfg.optimizer == "adam":
                opt_step += 1
                params, m1, m2 = adam_step(
                    params, grads, m1, m2, opt_step, cfg.lr, (cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay
                )
            else:
                params, m1 = sgd_step(params, grads, m1, cfg.lr, cfg.momentum, cfg.weight_decay)
        if first is None:
            raise RuntimeError("steps must be at least 1")

        new = {**prefixed(PARAM, params), **prefixed(MOMENT1, m1)}
        if cfg.optimizer == "adam":
            new.update(prefixed(MOMENT2, m2))
            new[OPT_STEP] = torch.tensor(opt_step, dtype=torch.int64, device=x.device)
        info = StepInfo(
            adapted=True,
            samples=len(x),
            samples_used=len(x),
            forwards=cfg.steps,
            backwards=cfg.steps,
            extra=drift_extra(first),
        )
        return StepResult(first, StreamState(new, state.meta).with_meta(step=state.meta.step + 1), info)

    def export_tensors(self, state: StreamState) -> tuple[int, dict[str, torch.Tensor]]:
        """The adapted norm affine parameters under the model's names; version = adaptation step."""
        return state.meta.step, unprefixed(PARAM, state.tensors)
