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

Fused multi-stream calls (:mod:`adapters.segments`): every replacement also reads the per-call
``segment_index``/``segment_sizes`` layout and, when given, per-segment affine parameters and
reference statistics; batch statistics are then reduced per segment and gathered per sample, so
one pass over several streams' images normalizes each stream as its own call would. GN and LN
layers are per-sample already; gradient methods swap them for :class:`StreamGroupNorm` /
:class:`StreamLayerNorm` (same type family, same tensors) only to apply a per-segment affine.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar, cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from adapters.base import Adapter, Segment, StepResult
from adapters.errors import UnsupportedModelError
from adapters.functional import modules_of_type, unprefixed, var_mean
from adapters.moments import segment_batch_norm
from adapters.norms import ChannelLayerNorm, NormKind, norm_layers
from adapters.segment_norm import SegmentBatchNorm
from adapters.segments import SEGMENT_BUFFERS, FusedStep, fused_or_stepped, per_sample, segment_moments

L = TypeVar("L", bound="StreamBatchNorm")


class StreamBatchNorm(_BatchNorm):
    """Base of the replacement layers: the source layer's tensors plus helpers for statistics."""

    segment_index: torch.Tensor | None
    segment_sizes: torch.Tensor | None
    segment_weight: torch.Tensor | None
    segment_bias: torch.Tensor | None
    segment_mean: torch.Tensor | None
    segment_var: torch.Tensor | None

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
        for name in SEGMENT_BUFFERS:
            self.register_buffer(name, None)

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

    # -- fused multi-stream calls -------------------------------------------------------------

    def layout(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(segment index per sample, samples per segment) of a fused call."""
        if self.segment_index is None or self.segment_sizes is None:
            raise RuntimeError("a fused call needs both segment_index and segment_sizes")
        return self.segment_index, self.segment_sizes

    def segment_batch_stats(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(biased var, mean) per segment and channel (S, C), and the values per channel (S,)."""
        index, sizes = self.layout()
        return segment_moments(x, index, sizes)

    def reference_stats(self, segments: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Each segment's own reference statistics (S, C) when given, else the source ones broadcast."""
        if self.segment_mean is not None and self.segment_var is not None:
            return self.segment_mean, self.segment_var
        mean, var = self.source_stats()
        return mean.expand(segments, -1), var.expand(segments, -1)

    @staticmethod
    def where_small(
        x: torch.Tensor,
        count: torch.Tensor,
        fallback: tuple[torch.Tensor, torch.Tensor],
        stats: tuple[torch.Tensor, torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``fallback`` for segments with fewer than two values per channel (a lone call uses the source there).

        Segments are never empty, so with two or more spatial values every segment has enough and
        ``stats`` come back untouched (no per-layer ``where`` over the segments of a conv layer).
        """
        if x.dim() > 2 and math.prod(x.shape[2:]) >= 2:
            return stats
        small = (count < 2)[:, None]
        return torch.where(small, fallback[0], stats[0]), torch.where(small, fallback[1], stats[1])

    def sample_affine(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Weight and bias per sample (N, C) from the segments' own affine, else the layer's (C,)."""
        index, _ = self.layout()
        weight = per_sample(self.segment_weight, index) if self.segment_weight is not None else self.weight
        bias = per_sample(self.segment_bias, index) if self.segment_bias is not None else self.bias
        return weight, bias

    def normalize_samples(self, x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
        """Normalize with per-sample statistics (N, C) and the per-sample affine; differentiable.

        ``x·scale + shift`` in one ``addcmul``: the same arithmetic as the no-grad path of
        :meth:`normalize`, valid with or without gradients.
        """
        mean, var = mean.to(x.dtype), var.to(x.dtype)
        weight, bias = self.sample_affine()
        scale = torch.rsqrt(var + self.eps)
        if weight is not None:
            scale = scale * weight
        shift = -mean * scale
        if bias is not None:
            shift = shift + bias
        view = [*mean.shape, *([1] * (x.dim() - 2))]
        return torch.addcmul(shift.reshape(view), x, scale.reshape(view))

    def normalize_segments(self, x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
        """Normalize every sample with its segment's statistics (S, C), gathered per sample."""
        index, _ = self.layout()
        return self.normalize_samples(x, per_sample(mean, index), per_sample(var, index))

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
        if self.segment_index is not None:
            return self.segmented_forward(input)
        if self.batch_stats is None or input.numel() // input.shape[1] < 2:
            return self.source_forward(input)
        if not torch.is_grad_enabled():  # same statistics, computed faster than train-mode batch_norm on CPU
            var, mean = var_mean(input, self.batch_dims(input))
            return self._fused_normalize(input, mean, var)
        return F.batch_norm(input, None, None, self.weight, self.bias, True, 0.0, self.eps)

    def segmented_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Each segment with its own batch statistics (source where it has fewer than two values per channel)."""
        segments = len(self.layout()[1])
        if self.batch_stats is None:
            return self.normalize_segments(x, *self.reference_stats(segments))
        has_reference = self.running_mean is not None and self.running_var is not None
        if torch.is_grad_enabled() and has_reference:
            return self._segment_batch_norm(x, segments)
        if not torch.is_grad_enabled() and self.segment_weight is None and self.segment_bias is None:
            # statistics and output in one kernel call where it serves x (adapters/moments.py)
            y = segment_batch_norm(x, self.layout()[0], segments, self.weight, self.bias, self.eps)
            if y is not None:
                return y
        var, mean, count = self.segment_batch_stats(x)
        if has_reference:
            mean, var = self.where_small(x, count, self.reference_stats(segments), (mean, var))
        return self.normalize_segments(x, mean, var)

    def _segment_batch_norm(self, x: torch.Tensor, segments: int) -> torch.Tensor:
        """The same normalization as one autograd function with its closed-form gradient (adapters/segment_norm.py)."""
        index, sizes = self.layout()
        channels = x.shape[1]
        weight = self.segment_weight if self.segment_weight is not None else self.weight
        bias = self.segment_bias if self.segment_bias is not None else self.bias
        weight = x.new_ones(channels) if weight is None else weight
        bias = x.new_zeros(channels) if bias is None else bias
        reference_mean, reference_var = self.reference_stats(segments)
        return cast(
            torch.Tensor,
            SegmentBatchNorm.apply(
                x,
                weight.expand(segments, channels),
                bias.expand(segments, channels),
                index,
                sizes,
                reference_mean,
                reference_var,
                self.eps,
            ),
        )


def _register_affine_buffers(module: nn.Module) -> None:
    """The per-call tensors of a GN/LN twin (all None in the shared model): layout and per-segment affine."""
    for name in ("segment_index", "segment_sizes", "segment_weight", "segment_bias"):
        module.register_buffer(name, None)


def _sample_index(index: torch.Tensor | None) -> torch.Tensor:
    """The per-sample segment index of a fused call; a per-segment affine without it is a wiring bug."""
    if index is None:
        raise RuntimeError("a per-segment affine needs segment_index")
    return index


def _channel_view(
    per_segment: torch.Tensor | None, shared: torch.Tensor | None, index: torch.Tensor, x: torch.Tensor
) -> torch.Tensor | None:
    """A per-channel affine tensor shaped to broadcast over ``x``: each sample's segment's row, else the shared one."""
    spatial = [1] * (x.dim() - 2)
    if per_segment is not None:
        return per_segment[index].reshape(x.shape[0], -1, *spatial)
    return shared.reshape(1, -1, *spatial) if shared is not None else None


class StreamGroupNorm(nn.GroupNorm):
    """GroupNorm that can apply a per-segment affine; otherwise exactly the source layer."""

    segment_index: torch.Tensor | None
    segment_weight: torch.Tensor | None
    segment_bias: torch.Tensor | None

    def __init__(self, source: nn.GroupNorm) -> None:
        nn.GroupNorm.__init__(self, source.num_groups, source.num_channels, source.eps, source.affine)
        self.weight = source.weight
        self.bias = source.bias
        _register_affine_buffers(self)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self.segment_weight is None and self.segment_bias is None:
            return super().forward(input)
        index = _sample_index(self.segment_index)
        y = F.group_norm(input, self.num_groups, None, None, self.eps)
        weight = _channel_view(self.segment_weight, self.weight, index, input)
        bias = _channel_view(self.segment_bias, self.bias, index, input)
        if weight is not None:
            y = y * weight
        return y + bias if bias is not None else y


class StreamChannelLayerNorm(StreamGroupNorm, ChannelLayerNorm):
    """:class:`ChannelLayerNorm` (still an LN by type) that can apply a per-segment affine."""


class StreamLayerNorm(nn.LayerNorm):
    """LayerNorm that can apply a per-segment affine over its normalized shape; otherwise the source layer."""

    segment_index: torch.Tensor | None
    segment_weight: torch.Tensor | None
    segment_bias: torch.Tensor | None

    def __init__(self, source: nn.LayerNorm) -> None:
        nn.LayerNorm.__init__(self, source.normalized_shape, source.eps, source.elementwise_affine)
        self.weight = source.weight
        self.bias = source.bias
        _register_affine_buffers(self)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self.segment_weight is None and self.segment_bias is None:
            return super().forward(input)
        index = _sample_index(self.segment_index)
        y = F.layer_norm(input, self.normalized_shape, None, None, self.eps)
        sample_shape = (input.shape[0], *([1] * (input.dim() - len(self.normalized_shape) - 1)), *self.normalized_shape)
        weight = self.segment_weight[index].reshape(sample_shape) if self.segment_weight is not None else self.weight
        bias = self.segment_bias[index].reshape(sample_shape) if self.segment_bias is not None else self.bias
        if weight is not None:
            y = y * weight
        return y + bias if bias is not None else y


def _affine_twin(module: nn.Module) -> nn.Module | None:
    """The segment-aware replacement of a plain GN/LN layer (exact types only), else None."""
    if type(module) is nn.GroupNorm:
        return StreamGroupNorm(module)
    if type(module) is ChannelLayerNorm:
        return StreamChannelLayerNorm(module)
    if type(module) is nn.LayerNorm:
        return StreamLayerNorm(module)
    return None


SEGMENT_AWARE = (StreamBatchNorm, StreamGroupNorm, StreamLayerNorm)


def swap_affine_norms(model: nn.Module) -> nn.Module:
    """Swap, in place, every plain GroupNorm/ChannelLayerNorm/LayerNorm for its segment-aware twin.

    Only those exact types: a subclass may compute something else, so it stays, and a fused step
    over a model whose adapted affine sits in such a layer falls back to one step per stream
    (:func:`segment_affine_ready`). Called by ``prepare`` on its own copy of the model.
    """
    for name, module in list(norm_layers(model, frozenset({NormKind.GN, NormKind.LN}))):
        replacement = _affine_twin(module)
        if replacement is None:
            continue
        replacement.train(module.training)
        if not name:
            return replacement
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, replacement)
    return model


def segment_layers(model: nn.Module) -> list[str]:
    """Names of the layers that understand a fused call's layout tensors."""
    return modules_of_type(model, SEGMENT_AWARE)


def segment_affine_ready(model: nn.Module, keys: Iterable[str]) -> bool:
    """Whether every layer owning one of ``keys`` (``layer.weight``...) can take a per-segment affine."""
    aware = set(segment_layers(model))
    return all(key.rpartition(".")[0] in aware for key in keys)


def fused_with_segment_affine(
    adapter: Adapter[Any], model: nn.Module, segments: Sequence[Segment], fused: FusedStep, affine_prefix: str
) -> list[StepResult]:
    """``step_many`` of a method that adapts norm affines (stored under ``affine_prefix``): fused when every
    layer owning one can take a per-segment affine, else each segment steps alone (a subclassed norm layer)."""
    if not segments or not segment_affine_ready(model, unprefixed(affine_prefix, segments[0].state.tensors)):
        return [adapter.step(model, seg.x, seg.state, adapt=seg.adapt) for seg in segments]
    return fused_or_stepped(adapter, model, segments, fused)


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
