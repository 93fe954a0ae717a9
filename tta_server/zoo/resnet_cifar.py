"""CIFAR ResNets of He et al. 2016 (Sec. 4.2) with option-A shortcuts and a choice of norm.

The layout of parameter names matches the widely used third-party CIFAR-10 checkpoints
(``conv1``, ``bn1``, ``layer{1,2,3}.{i}.conv{1,2}``, ``bn{1,2}``, ``linear``) so those
weights load without renaming. The attribute names ``bn*`` are kept for every norm kind:
adapters find norms by type, not by name.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from adapters.norms import NormKind
from tta_server.zoo.norms import make_norm

DEPTH_BLOCKS = {20: 3, 32: 5, 44: 7, 56: 9, 110: 18}
"""Depth -> BasicBlocks per stage (depth = 6n + 2)."""


class ShortcutA(nn.Module):
    """Parameter-free shortcut: subsample spatially and zero-pad channels (option A)."""

    def __init__(self, planes: int) -> None:
        super().__init__()
        self.pad = planes // 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class BasicBlock(nn.Module):
    """Two 3x3 convs with norm and ReLU, plus the shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int, norm: NormKind) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = make_norm(norm, planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = make_norm(norm, planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = ShortcutA(planes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs: widths 16/32/64, global average pooling, linear head."""

    def __init__(self, depth: int, norm: NormKind = NormKind.BN, num_classes: int = 10) -> None:
        super().__init__()
        if depth not in DEPTH_BLOCKS:
            raise ValueError(f"unsupported CIFAR ResNet depth {depth}; choose one of {sorted(DEPTH_BLOCKS)}")
        blocks = DEPTH_BLOCKS[depth]
        self.depth = depth
        self.norm = norm
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = make_norm(norm, 16)
        self.layer1 = self._stage(16, 16, blocks, stride=1)
        self.layer2 = self._stage(16, 32, blocks, stride=2)
        self.layer3 = self._stage(32, 64, blocks, stride=2)
        self.linear = nn.Linear(64, num_classes)
        self._init_weights()

    def _stage(self, in_planes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [BasicBlock(in_planes, planes, stride, self.norm)]
        layers += [BasicBlock(planes, planes, 1, self.norm) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        logits: torch.Tensor = self.linear(out)
        return logits


def cifar_resnet(depth: int, norm: NormKind | str = NormKind.BN, num_classes: int = 10) -> CifarResNet:
    """Build a CIFAR ResNet of ``depth`` with ``norm`` layers."""
    return CifarResNet(depth, NormKind(norm), num_classes)
