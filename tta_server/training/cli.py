"""The ``tta-server train`` command: argument parsing and a progress bar around the trainer."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import torch
import typer
from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from adapters.norms import NormKind
from tta_server.training.trainer import TrainConfig, resolve_precision, train

DEFAULT_WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "zoo" / "weights"


def train_command(
    depth: Annotated[int, typer.Option(help="CIFAR ResNet depth: 20, 32, 44, 56 or 110")] = 20,
    norm: Annotated[NormKind, typer.Option(help="normalization layers: bn, gn or ln")] = NormKind.BN,
    epochs: Annotated[int, typer.Option(min=1, help="training epochs")] = 30,
    batch_size: Annotated[int, typer.Option(min=8, help="images per SGD step")] = 128,
    lr: Annotated[float, typer.Option(help="peak learning rate")] = 0.1,
    seed: Annotated[int, typer.Option(help="seed for init, data order and augmentation")] = 0,
    warmup_epochs: Annotated[float, typer.Option(min=0, help="linear warm-up before the cosine decay")] = 2.0,
    init_weights: Annotated[
        Path | None,
        typer.Option(exists=True, dir_okay=False, help="start from these safetensors weights instead of random init"),
    ] = None,
    swa_epochs: Annotated[
        int, typer.Option(min=0, help="run the last N epochs at a constant --swa-lr and average their weights")
    ] = 0,
    swa_lr: Annotated[float, typer.Option(help="learning rate of the averaging epochs")] = 0.01,
    precision: Annotated[
        str, typer.Option(help="fp32, bf16 (autocast) or auto: bf16 on CUDA and CPUs with native bf16, else fp32")
    ] = "auto",
    train_data: Annotated[str, typer.Option(help="ImageFolder dir or .npz")] = "../shared/data/cifar10-jpeg/train",
    test_data: Annotated[str, typer.Option(help="ImageFolder dir or .npz")] = "../shared/data/cifar10-jpeg/test",
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
    run_dir: Annotated[Path | None, typer.Option(help="checkpoint folder (default runs/<name>)")] = None,
    out: Annotated[Path, typer.Option(help="where the final weights and model card go")] = DEFAULT_WEIGHTS_DIR,
    resume: Annotated[bool, typer.Option(help="continue from the checkpoint in run-dir")] = False,
    checkpoint_every: Annotated[int, typer.Option(min=1, help="steps between checkpoints")] = 200,
    max_steps: Annotated[int | None, typer.Option(help="stop (resumably) after this many steps")] = None,
    threads: Annotated[
        int | None, typer.Option(min=1, help="torch CPU threads; keep threads of all jobs <= cores")
    ] = None,
) -> None:
    """Train a CIFAR ResNet with BN, GN or LN; resumable, with periodic checkpoints."""
    try:
        config = TrainConfig(
            depth=depth,
            norm=norm,
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            seed=seed,
            warmup_epochs=warmup_epochs,
            init_weights=None if init_weights is None else str(init_weights),
            swa_epochs=swa_epochs,
            swa_lr=swa_lr,
            precision=resolve_precision(precision, device),
            train_data=train_data,
            test_data=test_data,
        )
    except ValidationError as exc:
        Console(stderr=True).print(f"[red]invalid training options:[/red] {exc}")
        raise typer.Exit(2) from exc
    if threads is not None:
        torch.set_num_threads(threads)
    console = Console(stderr=True)
    log_every = 100  # plain progress lines when stderr is not a terminal (logs, CI)
    columns = (
        TextColumn(f"[bold]{config.name}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.3f} lr {task.fields[lr]:.4f}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console) as bar:
        task = bar.add_task("train", total=None, loss=float("nan"), lr=0.0)

        def on_step(done: int, total: int, loss: float, step_lr: float) -> None:
            bar.update(task, completed=done, total=total, loss=loss, lr=step_lr)
            if not console.is_terminal and done % log_every == 0:
                console.print(f"{config.name} step {done}/{total} loss {loss:.3f} lr {step_lr:.4f}")

        weights = train(
            config,
            run_dir or Path("runs") / config.name,
            out,
            device=device,
            resume=resume,
            checkpoint_every=checkpoint_every,
            on_step=on_step,
            max_steps=max_steps,
        )
    if weights is None:
        console.print(f"stopped after {max_steps} steps; continue with --resume")
    else:
        console.print(f"wrote {weights} and its model card")
