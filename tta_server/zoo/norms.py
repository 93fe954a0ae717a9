"""Building the norm layers of the zoo's CIFAR ResNets (detection lives in adapters.norms)."""

from __future__ import annotations

from torch import nn

from adapters.norms import ChannelLayerNorm, NormKind

GN_GROUPS = 8
"""Groups per GroupNorm layer. 8 divides every CIFAR ResNet width (16, 32, 64)."""


def make_norm(kind: NormKind, channels: int) -> nn.Module:
    """Build one norm layer of ``kind`` for ``channels`` feature maps."""
    if kind is NormKind.BN:
        return nn.BatchNorm2d(channels)
    if kind is NormKind.GN:
        return nn.GroupNorm(min(GN_GROUPS, channels), channels)
    return ChannelLayerNorm(channels)
