"""A stream's state tensors packed in one flat buffer, so fused steps move streams, not tensors.

Why: a fused step over S streams stacks every named state tensor of every stream before the
forward and splits the updated ones back per stream after it. With tens of tensors per stream
(UnMix-TNS: two per BN layer; Tent: weight, bias and two optimizer moments per layer), that is
thousands of tiny tensor operations per fused batch, each a few microseconds of Python and
dispatcher overhead: measured as a tenth of a fused UnMix-TNS or Tent step at 64 streams.
:class:`PackedTensors` keeps one stream's tensors as one flat buffer the stream owns plus a
shared :class:`Layout`; splitting S streams is one concatenation and S copies, and stacking
them again is one ``torch.stack``. Code that reads a state by name still can: the named views
are made on first access (a read-only :class:`~collections.abc.Mapping`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property

import torch


@dataclass(frozen=True)
class Layout:
    """Names, shapes and dtype of the tensors packed in a flat buffer, in buffer order.

    ``loose`` names the tensors of another dtype (an optimizer's integer step count): they are
    kept beside the buffer, one small tensor each.
    """

    keys: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtype: torch.dtype
    loose: tuple[str, ...] = ()

    @cached_property
    def sizes(self) -> tuple[int, ...]:
        return tuple(math.prod(shape) for shape in self.shapes)

    @cached_property
    def numel(self) -> int:
        return sum(self.sizes)

    @cached_property
    def key_set(self) -> frozenset[str]:
        return frozenset(self.keys + self.loose)


_LAYOUTS: dict[Layout, Layout] = {}


def interned(layout: Layout) -> Layout:
    """One shared instance per distinct layout, so streams of one method compare layouts by identity."""
    return _LAYOUTS.setdefault(layout, layout)


class PackedTensors(Mapping[str, torch.Tensor]):
    """One stream's named tensors as views into one flat buffer that only this stream holds."""

    __slots__ = ("_views", "flat", "layout", "loose")

    def __init__(self, flat: torch.Tensor, layout: Layout, loose: Mapping[str, torch.Tensor] | None = None) -> None:
        if flat.dim() != 1 or flat.numel() != layout.numel or flat.dtype != layout.dtype:
            raise ValueError(
                f"flat buffer {flat.dtype} {tuple(flat.shape)} does not hold layout of {layout.numel} {layout.dtype}"
            )
        loose = dict(loose or {})
        if tuple(loose) != layout.loose:
            raise ValueError(f"loose tensors {sorted(loose)} do not match the layout's {sorted(layout.loose)}")
        self.flat = flat
        self.layout = layout
        self.loose = loose
        self._views: dict[str, torch.Tensor] | None = None

    def views(self) -> dict[str, torch.Tensor]:
        """The named tensors (views of the flat buffer), made once."""
        if self._views is None:
            layout = self.layout
            parts = torch.split(self.flat, list(layout.sizes))
            self._views = {k: p.view(s) for k, p, s in zip(layout.keys, parts, layout.shapes, strict=True)}
            self._views.update(self.loose)
        return self._views

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.views()[key]

    def __iter__(self) -> Iterator[str]:
        yield from self.layout.keys
        yield from self.layout.loose

    def __len__(self) -> int:
        return len(self.layout.keys) + len(self.layout.loose)

    def __contains__(self, key: object) -> bool:
        return key in self.layout.key_set

    def to(self, device: torch.device) -> PackedTensors:
        """The same tensors on ``device`` (one copy of the buffer; ``self`` when already there)."""
        if self.flat.device == device:
            return self
        return PackedTensors(self.flat.to(device), self.layout, {k: v.to(device) for k, v in self.loose.items()})

    def nbytes(self) -> int:
        loose = sum(v.numel() * v.element_size() for v in self.loose.values())
        return self.flat.numel() * self.flat.element_size() + loose


def same_layout(states: Sequence[Mapping[str, torch.Tensor]]) -> Layout | None:
    """The layout shared by every state when all are packed with one layout, else None."""
    first = states[0]
    if not isinstance(first, PackedTensors):
        return None
    layout = first.layout
    if all(isinstance(s, PackedTensors) and s.layout is layout for s in states):
        return layout
    return None


def stack_packed(states: Sequence[PackedTensors], layout: Layout) -> dict[str, torch.Tensor]:
    """Every name's tensors of all states stacked along a new leading dimension (one fresh buffer)."""
    flat = torch.stack([s.flat for s in states])
    count = len(states)
    parts = torch.split(flat, list(layout.sizes), dim=1)
    out = {key: part.view(count, *shape) for key, part, shape in zip(layout.keys, parts, layout.shapes, strict=True)}
    for key in layout.loose:
        out[key] = torch.stack([s.loose[key] for s in states])
    return out


def packable(tensors: Mapping[str, torch.Tensor]) -> bool:
    """Whether the stacked tensors can be packed: some tensors, all on one device."""
    values = list(tensors.values())
    return bool(values) and all(v.device == values[0].device for v in values)


def unstack_packed(tensors: Mapping[str, torch.Tensor], count: int) -> list[PackedTensors]:
    """The inverse of :func:`stack_packed`: row ``i`` of every stacked tensor, packed per stream.

    The tensors of the first tensor's dtype go into the buffer, any others stay loose.

    Each stream gets its own copy of its row (a view would keep the whole batch's buffer alive
    for as long as any one stream of it is stored).
    """
    dtype = next(iter(tensors.values())).dtype
    keys = tuple(k for k, v in tensors.items() if v.dtype == dtype)
    loose = tuple(k for k, v in tensors.items() if v.dtype != dtype)
    layout = interned(Layout(keys, tuple(tuple(tensors[k].shape[1:]) for k in keys), dtype, loose))
    flat = torch.cat([tensors[k].detach().reshape(count, -1) for k in keys], dim=1)
    return [
        PackedTensors(row.clone(), layout, {k: tensors[k][i].detach().clone() for k in loose})
        for i, row in enumerate(flat.unbind(0))
    ]
