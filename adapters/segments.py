"""Several streams' batches in one forward pass: the layout and the segment reductions.

Why: the service serves many streams that each send a few images; one forward pass per stream
costs far more than one pass over all their images. ``Adapter.step_many`` concatenates the
segments' images and tells the swapped-in norm layers, through per-call tensors, which sample
belongs to which segment:

- ``segment_index`` (N,) int64: the segment of every sample, segments in call order;
- ``segment_sizes`` (S,) float: the number of samples of every segment;
- optionally ``segment_weight``/``segment_bias`` (S, C): each stream's norm affine, and
  ``segment_mean``/``segment_var`` (S, C): each stream's reference statistics.

Layers reduce over the samples of a segment with ``index_add`` and gather per-segment values
per sample with indexing, never with a one-hot matrix product: ``0 · NaN = NaN``, so a product
would let one broken segment poison every other segment of the call. Every reduction here is
row-wise per segment for the same reason.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from adapters.base import Adapter, Segment, StepResult
from adapters.functional import Tensors, qualified
from adapters.moments import sample_moments
from adapters.packed import PackedTensors, packable, same_layout, stack_packed, unstack_packed

SEGMENT_INDEX = "segment_index"
SEGMENT_SIZES = "segment_sizes"
SEGMENT_WEIGHT = "segment_weight"
SEGMENT_BIAS = "segment_bias"
SEGMENT_MEAN = "segment_mean"
SEGMENT_VAR = "segment_var"
SEGMENT_BUFFERS = (SEGMENT_INDEX, SEGMENT_SIZES, SEGMENT_WEIGHT, SEGMENT_BIAS, SEGMENT_MEAN, SEGMENT_VAR)

_SEGMENT_ATTR = {
    "weight": SEGMENT_WEIGHT,
    "bias": SEGMENT_BIAS,
    "running_mean": SEGMENT_MEAN,
    "running_var": SEGMENT_VAR,
}


@dataclass(frozen=True)
class FusedBatch:
    """The concatenated images of several segments and the per-sample segment index."""

    x: torch.Tensor
    lengths: tuple[int, ...]
    index: torch.Tensor
    sizes: torch.Tensor

    @classmethod
    def of(cls, xs: Sequence[torch.Tensor]) -> FusedBatch:
        """Concatenate ``xs`` (same trailing shape, dtype and device) in order."""
        lengths = tuple(len(x) for x in xs)
        device = xs[0].device
        counts = torch.tensor(lengths, device=device)
        index = torch.repeat_interleave(torch.arange(len(xs), device=device), counts)
        return cls(torch.cat(list(xs)), lengths, index, counts.to(torch.float32))

    @property
    def count(self) -> int:
        """Number of segments S."""
        return len(self.lengths)

    def split(self, values: torch.Tensor) -> list[torch.Tensor]:
        """Per-segment copies of a per-sample tensor (own storage, like a single step's output)."""
        return [part.clone() for part in torch.split(values, list(self.lengths))]

    def per_layer(self, names: Iterable[str]) -> Tensors:
        """The layout tensors for every named segment-aware layer."""
        out: Tensors = {}
        for name in names:
            out[qualified(name, SEGMENT_INDEX)] = self.index
            out[qualified(name, SEGMENT_SIZES)] = self.sizes
        return out


def segment_sum(values: torch.Tensor, index: torch.Tensor, count: int) -> torch.Tensor:
    """Row sums per segment: (N, ...) -> (S, ...); rows of different segments never meet.

    With as many rows as segments every segment holds one row (segments are never empty and come
    in call order, so the index is ``0..S-1``): the sums are the rows themselves, no copy made.
    """
    if values.shape[0] == count:
        return values
    return values.new_zeros((count, *values.shape[1:])).index_add(0, index, values)


def per_sample(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Each sample's row of per-segment ``values`` (S, ...) -> (N, ...); the rows themselves when S = N."""
    return values if values.shape[0] == index.shape[0] else values[index]


def segment_moments(
    x: torch.Tensor, index: torch.Tensor, sizes: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(biased variance, mean, values per channel) per segment and channel: (S, C) each, counts (S,).

    The same first-two-moments arithmetic as :func:`adapters.functional.var_mean` over a
    segment's samples and spatial dimensions, so a fused batch normalizes like a lone one.
    """
    first, second = sample_moments(x)
    spatial = x[0, 0].numel() if x.shape[0] else 1
    count = sizes.to(x.dtype) * spatial
    denom = count.clamp_min(1.0)[:, None]
    mean = segment_sum(first, index, len(sizes)) / denom
    var = (segment_sum(second, index, len(sizes)) / denom - mean * mean).clamp_min(0.0)
    return var, mean, count


def segment_names(tensors: Mapping[str, torch.Tensor]) -> Tensors:
    """Model-named per-stream tensors (``layer.weight``) under their per-call segment names."""
    out: Tensors = {}
    for key, value in tensors.items():
        layer, _, attr = key.rpartition(".")
        out[qualified(layer, _SEGMENT_ATTR[attr])] = value
    return out


def stacked(states: Sequence[Mapping[str, torch.Tensor]]) -> Tensors:
    """Stack the same-named tensors of several streams along a new leading segment dimension.

    Fresh storage either way (layers may update the result in place); streams packed with one
    layout stack in one call.
    """
    layout = same_layout(states)
    if layout is not None:
        return stack_packed([s for s in states if isinstance(s, PackedTensors)], layout)
    return {key: torch.stack([s[key] for s in states]) for key in states[0]}


def row(tensors: Mapping[str, torch.Tensor], i: int) -> Tensors:
    """Segment ``i``'s copy of every stacked tensor (own storage: states never share a buffer)."""
    return {key: value[i].detach().clone() for key, value in tensors.items()}


def unstacked(tensors: Mapping[str, torch.Tensor], count: int) -> list[Mapping[str, torch.Tensor]]:
    """Every segment's row of the stacked tensors, each with its own storage: packed when they share a dtype."""
    if packable(tensors):
        return list(unstack_packed(tensors, count))
    return [row(tensors, i) for i in range(count)]


def segment_losses(values: torch.Tensor, lengths: Sequence[int]) -> list[torch.Tensor]:
    """Per-segment slices of a per-sample tensor (views: gradients flow to the fused graph)."""
    return list(torch.split(values, list(lengths)))


FusedStep = Callable[[nn.Module, Sequence[Segment]], list[StepResult]]


def fused_or_stepped(
    adapter: Adapter[Any], model: nn.Module, segments: Sequence[Segment], fused: FusedStep
) -> list[StepResult]:
    """Run ``fused`` over every group of two or more segments whose inputs concatenate, ``step`` for the rest.

    Segments fuse when their images share trailing shape, dtype and device; empty segments and
    segments without a partner take the ordinary ``step`` (fusing one segment saves nothing).
    """
    results: list[StepResult | None] = [None] * len(segments)
    groups: dict[tuple[object, ...], list[int]] = {}
    for i, seg in enumerate(segments):
        if len(seg.x):
            groups.setdefault((tuple(seg.x.shape[1:]), seg.x.dtype, seg.x.device), []).append(i)
    for members in groups.values():
        if len(members) < 2:
            continue
        for i, result in zip(members, fused(model, [segments[i] for i in members]), strict=True):
            results[i] = result
    out: list[StepResult] = []
    for seg, done in zip(segments, results, strict=True):
        out.append(done if done is not None else adapter.step(model, seg.x, seg.state, adapt=seg.adapt))
    return out
