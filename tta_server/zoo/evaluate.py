"""Clean (no adaptation) top-1 accuracy of a model on labelled images."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from tta_server.data.datasets import LabeledImages
from tta_server.zoo.transforms import normalize, to_tensor_batch


@torch.no_grad()
def top1_accuracy(
    model: nn.Module,
    data: LabeledImages,
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int = 500,
    device: str = "cpu",
) -> float:
    """Fraction of correctly classified images, model in eval mode (source statistics)."""
    was_training = model.training
    model.eval()
    correct = 0
    for start in range(0, len(data), batch_size):
        x = normalize(to_tensor_batch(data.x[start : start + batch_size]).to(device), mean, std)
        y = torch.from_numpy(data.y[start : start + batch_size]).to(device)
        correct += int((model(x).argmax(1) == y).sum())
    model.train(was_training)
    return correct / max(len(data), 1)
