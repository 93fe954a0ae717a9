"""Recognising normalization layers by type (never by layer names).

- BatchNorm: any :class:`torch.nn.modules.batchnorm._BatchNorm`.
- LayerNorm: :class:`torch.nn.LayerNorm`, or :class:`ChannelLayerNorm` (per-sample
  normalization over C, H, W with a per-channel affine: a one-group GroupNorm, subclassed so
  that GN and LN models can be told apart).
- GroupNorm: any other :class:`torch.nn.GroupNorm`.
"""

from __future__ import annotations

from collections.abc import Iterator
from enum import StrEnum

from torch import nn


class NormKind(StrEnum):
    """The normalization family of a layer or model."""

    BN = "bn"
    GN = "gn"
    LN = "ln"


class ChannelLayerNorm(nn.GroupNorm):
    """LayerNorm for conv features: normalize each sample over (C, H, W), affine per channel."""

    def __init__(self, num_channels: int, eps: float = 1e-5) -> None:
        super().__init__(num_groups=1, num_channels=num_channels, eps=eps, affine=True)


def norm_kind_of(module: nn.Module) -> NormKind | None:
    """The kind of a single layer, or None when it is not a normalization layer."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return NormKind.BN
    if isinstance(module, (ChannelLayerNorm, nn.LayerNorm)):
        return NormKind.LN
    if isinstance(module, nn.GroupNorm):
        return NormKind.GN
    return None


def detect_norm_kinds(model: nn.Module) -> set[NormKind]:
    """All norm kinds a model contains (empty when it has no normalization layer)."""
    kinds = {norm_kind_of(m) for m in model.modules()}
    return {k for k in kinds if k is not None}


def norm_layers(model: nn.Module, kinds: frozenset[NormKind] | None = None) -> Iterator[tuple[str, nn.Module]]:
    """(qualified name, module) of every norm layer, optionally only of ``kinds``, in model order."""
    for name, module in model.named_modules():
        kind = norm_kind_of(module)
        if kind is not None and (kinds is None or kind in kinds):
            yield name, module
