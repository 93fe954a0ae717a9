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


@dataclass(frozen=True)
class Restored:
    """What a checkpoint holds besides tensors: position, configuration, provenance."""

    progress: Progress
    config: dict[str, Any]
    init_sha256: str | None
    """sha256 of the init weights as loaded when the run started (None: random init or an older checkpoint)."""


def save_checkpoint(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.SGD,
    progress: Progress,
    config: dict[str, Any],
    averaged: nn.Module | None = None,
    init_sha256: str | None = None,
) -> None:
    """Atomically write model and SGD momentum buffers plus progress and config.

    ``averaged`` (the running weight average of a ``swa_epochs`` run) is stored under ``swa.``
    so a resumed run continues the same average. ``init_sha256`` is kept so that the card of a
    resumed run names the weights the run really started from, even if that file was replaced.
    """
    tensors = {f"model.{k}": v.detach().contiguous() for k, v in model.state_dict().items()}
    if averaged is not None:
        tensors |= {f"swa.{k}": v.detach().contiguous() for k, v in averaged.state_dict().items()}
    for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"]):
        buf = optimizer.state.get(p, {}).get("momentum_buffer")
        if buf is not None:
            tensors[f"opt.{i}"] = buf.contiguous()
    meta = {"epoch": str(progress.epoch), "step": str(progress.step), "config": json.dumps(config)}
    if init_sha256 is not None:
        meta["init_sha256"] = init_sha256
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)


def load_checkpoint(
    path: Path, model: nn.Module, optimizer: torch.optim.SGD, averaged: nn.Module | None = None
) -> Restored:
    """Restore model, optimizer (and weight average) in place; return position, config, provenance."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    if averaged is not None:
        averaged.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("swa.")})
    for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"]):
        if f"opt.{i}" in tensors:
            optimizer.state[p]["momentum_buffer"] = tensors[f"opt.{i}"].to(p.device)
    progress = Progress(int(meta["epoch"]), int(meta["step"]))
    return Restored(progress, json.loads(meta["config"]), meta.get("init_sha256"))
