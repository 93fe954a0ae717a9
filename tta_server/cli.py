"""The ``tta-server`` command line: ``serve``, ``models`` and ``train``.

Settings come from ``TTA_*`` environment variables; a flag given on the command line wins.
An invalid value exits with status 2 and a message naming the setting.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from tta_server.evaluation.cli import eval_command, report_command
from tta_server.settings import DeviceChoice, Settings
from tta_server.training.cli import train_command

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Test-time adaptation inference server.")
app.command("train")(train_command)
app.command("eval")(eval_command)
app.command("report")(report_command)
console = Console()
err_console = Console(stderr=True)


def load_settings(**overrides: Any) -> Settings:
    """Settings from the environment, with non-None CLI overrides; exits 2 naming a bad setting."""
    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        return Settings(**given)
    except ValidationError as exc:
        for e in exc.errors():
            name = ".".join(str(p) for p in e["loc"])
            err_console.print(f"[red]invalid setting {name} (env TTA_{name.upper()}):[/red] {e['msg']}")
        raise typer.Exit(code=2) from None


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="bind address [env TTA_HOST]")] = None,
    port: Annotated[int | None, typer.Option(help="TCP port [env TTA_PORT]")] = None,
    store_url: Annotated[str | None, typer.Option("--store", help="state store URL [env TTA_STORE_URL]")] = None,
    device: Annotated[DeviceChoice | None, typer.Option(help="auto, cpu or cuda [env TTA_DEVICE]")] = None,
    log_level: Annotated[str | None, typer.Option(help="debug, info, warning, error [env TTA_LOG_LEVEL]")] = None,
    models_dir: Annotated[Path | None, typer.Option(help="third-party weights folder [env TTA_MODELS_DIR]")] = None,
    model_config_file: Annotated[
        Path | None, typer.Option("--model-config", help="bring-your-own models JSON [env TTA_MODEL_CONFIG_FILE]")
    ] = None,
) -> None:
    """Run the HTTP server."""
    import uvicorn

    from tta_server.app import create_app

    settings = load_settings(
        host=host,
        port=port,
        store_url=store_url,
        device=device,
        log_level=log_level,
        models_dir=models_dir,
        model_config_file=model_config_file,
    )
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        application = create_app(settings)
    except (ValueError, RuntimeError) as exc:
        err_console.print(f"[red]cannot start:[/red] {exc}")
        raise typer.Exit(code=2) from None
    uvicorn.run(application, host=settings.host, port=settings.port, log_level=settings.log_level)


@app.command()
def models(
    models_dir: Annotated[Path | None, typer.Option(help="third-party weights folder [env TTA_MODELS_DIR]")] = None,
    model_config_file: Annotated[
        Path | None, typer.Option("--model-config", help="bring-your-own models JSON [env TTA_MODEL_CONFIG_FILE]")
    ] = None,
    evaluate: Annotated[
        Path | None, typer.Option(help="measure clean top-1 of every available model on this ImageFolder or .npz")
    ] = None,
) -> None:
    """Print the model catalogue (optionally measuring clean accuracy)."""
    from tta_server.zoo.catalogue import CatalogueError, build_catalogue

    settings = load_settings(models_dir=models_dir, model_config_file=model_config_file)
    try:
        catalogue = build_catalogue(settings.models_dir, settings.model_config_file)
    except CatalogueError as exc:
        err_console.print(f"[red]{exc}[/red]")
        raise typer.Exit(code=2) from None
    table = Table(title="model catalogue")
    for column in ("name", "arch", "norm", "origin", "classes", "input", "clean top-1", "sha256"):
        table.add_column(column, no_wrap=True)
    table.add_column("weights", overflow="fold")
    measured = _measure(catalogue, evaluate) if evaluate is not None else {}
    for spec in catalogue.specs():
        acc = measured.get(spec.name, spec.clean_top1)
        table.add_row(
            spec.name,
            spec.arch,
            spec.norm.value if spec.norm else "?",
            spec.origin,
            str(len(spec.classes)),
            str(spec.input_size),
            f"{100 * acc:.2f}%" if acc is not None else "-",
            (spec.sha256 or "")[:8],
            "ok" if spec.weights.is_file() else f"[red]missing: {spec.weights}[/red]",
        )
    console.print(table)


def _measure(catalogue: Any, data_path: Path) -> dict[str, float]:
    from tta_server.data.datasets import load_labeled_images
    from tta_server.zoo.evaluate import top1_accuracy

    data = load_labeled_images(data_path)
    result = {}
    for spec in catalogue.specs():
        if spec.weights.is_file():
            loaded = catalogue.load(spec.name)
            result[spec.name] = top1_accuracy(loaded.model, data, spec.mean, spec.std)
    return result


@app.callback()
def _root() -> None:
    """Test-time adaptation inference server."""


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
