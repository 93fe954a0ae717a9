"""Train a CIFAR ResNet (BN, GN or LN) on an ImageFolder or .npz training set.

Built to run for hours on a few CPU cores and survive interruption: the data order and
augmentation of every step are pure functions of (seed, epoch, step), the learning rate is
a pure function of the global step, and checkpoints hold the model, the SGD momentum and
the position. ``--resume`` therefore continues exactly where the last checkpoint left off.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal, cast

import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field
from safetensors.torch import load_file, save_file

from adapters.norms import NormKind
from tta_server.data.datasets import LabeledImages, load_labeled_images
from tta_server.training.augment import random_crop_flip
from tta_server.training.checkpoint import Progress, load_checkpoint, save_checkpoint
from tta_server.zoo.catalogue import file_sha256
from tta_server.zoo.evaluate import top1_accuracy
from tta_server.zoo.resnet_cifar import cifar_resnet
from tta_server.zoo.transforms import normalize

log = logging.getLogger(__name__)

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


class TrainConfig(BaseModel):
    """Everything that determines a training run (stored in checkpoints and model cards)."""

    depth: int = Field(20, description="CIFAR ResNet depth (6n+2)")
    norm: NormKind = NormKind.BN
    epochs: int = Field(30, ge=1, le=1000)
    batch_size: int = Field(128, ge=8, le=4096)
    lr: float = Field(0.1, gt=0, le=10)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0, le=0.1)
    warmup_epochs: float = Field(2.0, ge=0)
    seed: int = 0
    precision: Literal["fp32", "bf16"] = "bf16"
    train_data: str = "../shared/data/cifar10-jpeg/train"
    test_data: str = "../shared/data/cifar10-jpeg/test"
    mean: tuple[float, float, float] = CIFAR10_MEAN
    std: tuple[float, float, float] = CIFAR10_STD
    init_weights: str | None = Field(
        None, description="safetensors weights to start from (a new schedule on a trained model) instead of random"
    )

    @property
    def name(self) -> str:
        return f"resnet{self.depth}-{self.norm.value}"


ProgressHook = Callable[[int, int, float, float], None]
"""Called after each step with (global step, total steps, loss, lr)."""


def lr_at(config: TrainConfig, global_step: int, steps_per_epoch: int) -> float:
    """Linear warm-up, then cosine decay to zero over the remaining steps."""
    total = config.epochs * steps_per_epoch
    warm = int(config.warmup_epochs * steps_per_epoch)
    if global_step < warm:
        return config.lr * (global_step + 1) / warm
    progress = (global_step - warm) / max(total - warm, 1)
    return 0.5 * config.lr * (1 + math.cos(math.pi * progress))


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, object]]:
    """No weight decay on norm affine parameters and biases (1-D tensors)."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _step_generator(seed: int, epoch: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch * 10_007 + step)


def train(
    config: TrainConfig,
    run_dir: Path,
    out_dir: Path,
    device: str = "cpu",
    resume: bool = False,
    checkpoint_every: int = 200,
    on_step: ProgressHook | None = None,
    max_steps: int | None = None,
) -> Path | None:
    """Train, checkpointing to ``run_dir``; write the final weights and card to ``out_dir``.

    Returns the weights path, or None when ``max_steps`` stopped the run early (a partial
    run, resumable with ``resume=True``).
    """
    torch.manual_seed(config.seed)
    data = load_labeled_images(config.train_data)
    model = cifar_resnet(config.depth, config.norm, num_classes=len(data.classes)).to(device)
    init_sha256 = None if config.init_weights is None else load_init_weights(model, Path(config.init_weights))
    optimizer = torch.optim.SGD(
        _param_groups(model, config.weight_decay), lr=config.lr, momentum=config.momentum, nesterov=True
    )
    ckpt = run_dir / "checkpoint.safetensors"
    progress = Progress(0, 0)
    if resume and ckpt.exists():
        progress, saved = load_checkpoint(ckpt, model, optimizer)
        if TrainConfig.model_validate(saved) != config:
            raise ValueError(f"checkpoint {ckpt} was made with a different configuration: {saved}")
        log.info("resuming %s at epoch %d step %d", config.name, progress.epoch, progress.step)
    steps_per_epoch = len(data) // config.batch_size
    images = torch.from_numpy(data.x).permute(0, 3, 1, 2)
    labels = torch.from_numpy(data.y)
    steps_done = 0
    for epoch in range(progress.epoch, config.epochs):
        order = torch.randperm(len(data), generator=_step_generator(config.seed, epoch, -1))
        model.train()
        for step in range(progress.step if epoch == progress.epoch else 0, steps_per_epoch):
            global_step = epoch * steps_per_epoch + step
            lr = lr_at(config, global_step, steps_per_epoch)
            for group in optimizer.param_groups:
                group["lr"] = lr
            idx = order[step * config.batch_size : (step + 1) * config.batch_size]
            batch = random_crop_flip(images[idx], _step_generator(config.seed, epoch, step))
            x = normalize(batch.to(device), config.mean, config.std)
            with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=config.precision == "bf16"):
                loss = F.cross_entropy(model(x), labels[idx].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"loss became {loss.item()} at epoch {epoch} step {step}")
            if on_step is not None:
                on_step(global_step + 1, config.epochs * steps_per_epoch, loss.item(), lr)
            steps_done += 1
            nxt = Progress(epoch, step + 1) if step + 1 < steps_per_epoch else Progress(epoch + 1, 0)
            if (global_step + 1) % checkpoint_every == 0 or step + 1 == steps_per_epoch:
                save_checkpoint(ckpt, model, optimizer, nxt, config.model_dump(mode="json"))
            if max_steps is not None and steps_done >= max_steps:
                save_checkpoint(ckpt, model, optimizer, nxt, config.model_dump(mode="json"))
                return None
    return export_model(model, config, data, out_dir, device, init_sha256)


def load_init_weights(model: torch.nn.Module, path: Path) -> str:
    """Start from trained weights, so a model whose schedule was too short can be improved by
    a second schedule (a warm restart) without repeating the hours already spent on it.

    Returns the file's sha256, taken when it is loaded: the card must name the weights the run
    started from, even if the file is replaced during the hours the run takes.
    """
    if not path.is_file():
        raise FileNotFoundError(f"init weights {path} do not exist")
    try:
        model.load_state_dict(load_file(str(path)))
    except RuntimeError as exc:
        raise ValueError(f"init weights {path} do not fit this architecture: {exc}") from exc
    return file_sha256(path)


def export_model(
    model: torch.nn.Module,
    config: TrainConfig,
    train_data: LabeledImages,
    out_dir: Path,
    device: str,
    init_sha256: str | None,
) -> Path:
    """Save weights as safetensors and write a model card (JSON + Markdown) beside them."""
    test = load_labeled_images(config.test_data)
    acc = top1_accuracy(model, test, config.mean, config.std, device=device)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = out_dir / f"{config.name}.safetensors"
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(weights), metadata={"arch": f"cifar_resnet{config.depth}", "norm": config.norm.value})
    card = {
        "name": config.name,
        "arch": f"cifar_resnet{config.depth}",
        "norm": config.norm.value,
        "classes": list(train_data.classes),
        "input_size": int(train_data.x.shape[1]),
        "mean": list(config.mean),
        "std": list(config.std),
        "train_data": config.train_data,
        "train_images": len(train_data),
        "test_data": config.test_data,
        "test_images": len(test),
        "clean_top1": round(acc, 4),
        "epochs": config.epochs,
        "seed": config.seed,
        "init_weights": config.init_weights,
        "init_sha256": init_sha256,
        "config": config.model_dump(mode="json"),
        "sha256": file_sha256(weights),
        "trained_on": f"{device}, torch {torch.__version__}",
        "date": time.strftime("%Y-%m-%d"),
    }
    (out_dir / f"{config.name}.json").write_text(json.dumps(card, indent=2) + "\n")
    (out_dir / f"{config.name}.md").write_text(render_card(card))
    return weights


def _init_line(card: Mapping[str, Any]) -> str:
    if not card.get("init_weights"):
        return "random (seeded)"
    return f"`{card['init_weights']}` (sha256 `{card['init_sha256']}`), then this run's schedule"


def _command(card: Mapping[str, Any]) -> str:
    """The ``tta-server train`` command line that reproduces this card's run."""
    cfg = cast(dict[str, Any], card["config"])
    cmd = f"tta-server train --depth {cfg['depth']} --norm {card['norm']} --epochs {card['epochs']}"
    cmd += f" --seed {card['seed']}"
    defaults = TrainConfig()
    if cfg["lr"] != defaults.lr:
        cmd += f" --lr {cfg['lr']}"
    if cfg["warmup_epochs"] != defaults.warmup_epochs:
        cmd += f" --warmup-epochs {cfg['warmup_epochs']}"
    if card.get("init_weights"):
        cmd += f" --init-weights {card['init_weights']}"
    return cmd


def render_card(card: Mapping[str, Any]) -> str:
    """A short human-readable model card."""
    cfg = cast(dict[str, Any], card["config"])
    return (
        f"# {card['name']}\n\n"
        f"CIFAR ResNet-{cfg['depth']} (He et al. 2016, option-A shortcuts) with {str(card['norm']).upper()} "
        f"normalization, trained by `{_command(card)}`.\n\n"
        f"| field | value |\n|---|---|\n"
        f"| training data | `{card['train_data']}` ({card['train_images']} images) |\n"
        f"| augmentation | 4-px padded random crop, horizontal flip |\n"
        f"| optimizer | SGD nesterov, lr {cfg['lr']}, momentum {cfg['momentum']}, wd {cfg['weight_decay']}, "
        f"batch {cfg['batch_size']}, {cfg['warmup_epochs']} warm-up epochs then cosine |\n"
        f"| precision | {cfg['precision']} autocast |\n"
        f"| initial weights | {_init_line(card)} |\n"
        f"| epochs / seed | {card['epochs']} / {card['seed']} |\n"
        f"| clean top-1 on `{card['test_data']}` | **{100 * float(str(card['clean_top1'])):.2f}%** "
        f"({card['test_images']} images) |\n"
        f"| mean / std | {card['mean']} / {card['std']} |\n"
        f"| trained on | {card['trained_on']}, {card['date']} |\n"
        f"| sha256 | `{card['sha256']}` |\n"
    )
