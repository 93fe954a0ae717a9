"""Replacement BN layers that read per-stream tensors, and the one-time swap that installs them.

Why swap at all: BN's behaviour (which statistics normalize the batch, and whether they update)
is fixed by ``module.training``, a flag on the *shared* model. Flipping it per request would race
between streams and changes the shared model. Instead ``prepare`` installs, once per
(model, method), layers whose behaviour is decided by *per-call tensors* that enter through
:func:`torch.func.functional_call`:

- Each replacement keeps the source layer's parameters and buffers under the same names
  (``weight``, ``bias``, ``running_mean``, ``running_var``, ``num_batches_tracked``), so
  state-dict keys and norm detection (:mod:`adapters.norms`) are unchanged.
- The per-call tensors are registered as ``None`` buffers. The shared model therefore holds no
  adaptation tensor at all, and **a prepared model called directly is exactly the source model
  in eval mode** (the server may use that for source-vs-adapted disagreement).
- Layers that update statistics do so in place on the per-call tensors, which the method cloned
  from the stream's state beforehand; the shared model is never written.

Replacements subclass ``_BatchNorm`` and accept BN1d/2d/3d inputs: statistics are reduced over
every dimension except the channel (dim 1). Instance statistics reduce over the spatial
dimensions only; a BN1d input (N, C) has none, so methods fall back to source statistics there.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from adapters.errors import UnsupportedModelError
from adapters.functional import var_mean
from adapters.norms import NormKind, norm_layers

L = TypeVar("L", bound="StreamBatchNorm")


class StreamBatchNorm(_BatchNorm):
    """Base of the replacement layers: the source layer's tensors plus helpers for statistics."""

    def __init__(self, source: _BatchNorm) -> None:
        super().__init__(
            source.num_features,
            eps=source.eps,
            momentum=source.momentum,
            affine=source.affine,
            track_running_stats=source.track_running_stats,
        )
        # Take over the source tensors themselves (no copy): prepare() already works on a copy.
        self.weight = source.weight
        self.bias = source.bias
        self.running_mean = source.running_mean
        self.running_var = source.running_var
        self.num_batches_tracked = source.num_batches_tracked
        self.train(source.training)
        self.replaces_1d: bool = isinstance(source, nn.BatchNorm1d)
        """Whether the source was a BatchNorm1d (inputs without spatial dims: no instance statistics)."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected an input with a channel dimension, got shape {tuple(input.shape)}")

    @staticmethod
    def batch_dims(x: torch.Tensor) -> list[int]:
        """Dimensions that batch statistics reduce over: all but the channel."""
        return [0, *range(2, x.dim())]

    @staticmethod
    def instance_dims(x: torch.Tensor) -> list[int]:
        """Dimensions that instance statistics reduce over: the spatial ones (empty for BN1d)."""
        return list(range(2, x.dim()))

    def source_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The source layer in eval mode (batch statistics when the layer tracks none)."""
        has_stats = self.running_mean is not None and self.running_var is not None
        return F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, not has_stats, 0.0, self.eps
        )

    def normalize(self, x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
        """Normalize with per-channel (C) or per-sample-per-channel (N, C) statistics, then the affine.

        Written out (not ``F.batch_norm``) so gradients flow through ``mean`` and ``var``; when no
        gradient is being recorded the same arithmetic runs as one fused ``F.batch_norm`` call
        (per-sample statistics by viewing the batch as one sample of N·C channels), which keeps
        forward-only methods close to the cost of plain inference.
        """
        mean, var = mean.to(x.dtype), var.to(x.dtype)
        if not torch.is_grad_enabled():
            return self._fused_normalize(x, mean, var)
        shape = [1] * x.dim()
        if mean.dim() == 1:
            shape[1] = -1
        else:
            shape[0], shape[1] = mean.shape[0], mean.shape[1]
        y = (x - mean.reshape(shape)) * torch.rsqrt(var.reshape(shape) + self.eps)
        if self.weight is not None:
            affine_shape = [1, -1] + [1] * (x.dim() - 2)
            y = y * self.weight.reshape(affine_shape) + self.bias.reshape(affine_shape)
        return y

    def _fused_normalize(self, x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
        if mean.dim() == 1:
            return F.batch_norm(x, mean, var, self.weight, self.bias, False, 0.0, self.eps)
        # per-sample statistics: y = x·scale + shift in one pass, keeping x's memory format
        scale = torch.rsqrt(var + self.eps)
        if self.weight is not None:
            scale = scale * self.weight
        shift = -mean * scale
        if self.bias is not None:
            shift = shift + self.bias
        view = [*mean.shape, *([1] * (x.dim() - 2))]
        return torch.addcmul(shift.reshape(view), x, scale.reshape(view))

    def source_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(running_mean, running_var); raises when the source layer tracks no statistics."""
        if self.running_mean is None or self.running_var is None:
            raise UnsupportedModelError("a BatchNorm layer without running statistics has no source statistics")
        return self.running_mean, self.running_var


class BatchStatsNorm(StreamBatchNorm):
    """BN that normalizes with the current batch's statistics (BN-1 / Tent / SAR semantics).

    Per-call tensor ``batch_stats`` (any value): present -> batch statistics with the biased
    variance, exactly like PyTorch's train-mode BN (gradients flow through the statistics); absent
    -> the source layer. A BN1d input with one sample has no batch statistics and keeps the source.
    """

    batch_stats: torch.Tensor | None

    def __init__(self, source: _BatchNorm) -> None:
        super().__init__(source)
        self.register_buffer("batch_stats", None)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        if self.batch_stats is None or input.numel() // input.shape[1] < 2:
            return self.source_forward(input)
        if not torch.is_grad_enabled():  # same statistics, computed faster than train-mode batch_norm on CPU
            var, mean = var_mean(input, self.batch_dims(input))
            return self._fused_normalize(input, mean, var)
        return F.batch_norm(input, None, None, self.weight, self.bias, True, 0.0, self.eps)


def swap_batchnorms(model: nn.Module, factory: Callable[[_BatchNorm], nn.Module]) -> nn.Module:
    """A copy of ``model`` in eval mode, frozen, with every BN layer (found by type) replaced by ``factory(bn)``.

    The input model is left untouched, so one loaded model can be prepared for several methods.
    """
    model = copy.deepcopy(model)
    for name, module in list(norm_layers(model, frozenset({NormKind.BN}))):
        if not isinstance(module, _BatchNorm) or isinstance(module, StreamBatchNorm):
            continue
        replacement = factory(module)
        if not name:
            model = replacement
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, replacement)
    model.eval()
    model.requires_grad_(False)
    return model


def prepared_layers(model: nn.Module, cls: type[StreamBatchNorm]) -> list[str]:
    """Names of the ``cls`` layers of a prepared model; raises when BN layers were not swapped.

    Catches a wiring bug (a model not passed through this method's ``prepare``) that would
    otherwise silently predict with the source model.
    """
    names: list[str] = []
    for name, module in norm_layers(model, frozenset({NormKind.BN})):
        if not isinstance(module, cls):
            raise RuntimeError(
                f"BN layer '{name or '<root>'}' is {type(module).__name__}, not {cls.__name__}: "
                "pass the model through this method's prepare() first"
            )
        names.append(name)
    return names


def check_source_statistics(model: nn.Module) -> None:
    """Raise :class:`UnsupportedModelError` when a BN layer has no running statistics to use as source."""
    for name, module in norm_layers(model, frozenset({NormKind.BN})):
        if getattr(module, "running_mean", None) is None or getattr(module, "running_var", None) is None:
            raise UnsupportedModelError(
                f"BatchNorm layer '{name or '<root>'}' tracks no running statistics, so it has no source statistics"
            )
