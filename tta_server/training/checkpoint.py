"""Resumable training checkpoints as safetensors (model tensors, optimizer moments, progress).

No pickle: the training position and configuration go into the safetensors metadata as
JSON, tensors under ``model.`` and ``opt.`` prefixes. Writes are atomic (temp file +
rename) so an interrupted run never leaves a half-written checkpoint behind.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn


@dataclass(frozen=True)
class Progress:
    """Where training stands: the next epoch and step within it to run."""

    epoch: int
    step: int


def save_checkpoint(
    path: Path, model: nn.Module, optimizer: torch.optim.SGD, progress: Progress, config: dict[str, Any]
) -> None:
    """Atomically write model and SGD momentum buffers plus progress and config."""
    tensors = {f"model.{k}": v.detach().contiguous() for k, v in model.state_dict().items()}
    for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"]):
        buf = optimizer.state.get(p, {}).get("momentum_buffer")
        if buf is not None:
            tensors[f"opt.{i}"] = buf.contiguous()
    meta = {"epoch": str(progress.epoch), "step": str(progress.step), "config": json.dumps(config)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.SGD) -> tuple[Progress, dict[str, Any]]:
    """Restore model and optimizer in place; return the progress and the saved config."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"]):
        if f"opt.{i}" in tensors:
            optimizer.state[p]["momentum_buffer"] = tensors[f"opt.{i}"].to(p.device)
    return Progress(int(meta["epoch"]), int(meta["step"])), json.loads(meta["config"])
