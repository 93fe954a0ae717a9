"""``tta-server eval`` and ``tta-server report``: the accuracy-under-shift benchmark commands.

``eval`` runs one (model, method, setting, batch size, severity) in process and writes
``<run>.json`` and ``<run>.md`` into ``--out``; ``report`` turns folders of such runs into
comparison tables and plots. Errors a user can fix (unknown model, method, corruption, bad
config) exit with status 2 and one red line.
"""

from __future__ import annotations

import json
import logging
import shlex
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from tta_server.settings import Settings
from tta_server.shift.streams import DEFAULT_DIRICHLET_DELTA, Setting

logger = logging.getLogger("tta_server.eval")
console = Console()
err_console = Console(stderr=True)

DEFAULT_TEST_SET = Path("cifar10-jpeg") / "test"
"""Under the settings' data folder (``TTA_DATA_DIR``, default ``../shared/data``)."""


class RichProgress:
    """A rich progress bar over images (used when stdout is a terminal)."""

    def __init__(self, bar: Progress) -> None:
        self.bar = bar
        self.task = bar.add_task("", total=None)

    def start(self, total_images: int, description: str) -> None:
        self.bar.update(self.task, total=total_images, description=description)

    def advance(self, images: int, description: str) -> None:
        self.bar.update(self.task, advance=images, description=description)

    def note(self, message: str) -> None:
        self.bar.console.log(message)


class LogProgress:
    """Plain log lines when output is not a terminal (CI logs, files): one line per corruption.

    A log is read after the fact, so it gets one line when each domain (corruption) starts,
    with how far the stream is, and nothing per batch or per percentage: those repeat what the
    domain lines already say. A domain that shows up again (a stream that interleaves domains)
    is not announced twice.
    """

    def __init__(self) -> None:
        self.total = 0
        self.done = 0
        self.seen: set[str] = set()

    def start(self, total_images: int, description: str) -> None:
        self.total = max(total_images, 1)
        logger.info("stream of %d images", total_images)

    def advance(self, images: int, description: str) -> None:
        started_at = self.done
        self.done += images
        if description not in self.seen:
            self.seen.add(description)
            percent = 100 * started_at / self.total
            logger.info("%s (from image %d of %d, %.0f%% done)", description, started_at + 1, self.total, percent)

    def note(self, message: str) -> None:
        logger.info("%s", message)


def parse_config(raw: str | None) -> dict[str, Any]:
    """``--config`` as a JSON object, or a path to a JSON file; exits 2 otherwise."""
    if raw is None:
        return {}
    text = raw
    if not raw.lstrip().startswith("{") and Path(raw).is_file():
        text = Path(raw).read_text()
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        err_console.print(f"[red]--config is not a JSON object or a JSON file:[/red] {exc}")
        raise typer.Exit(code=2) from None
    if not isinstance(value, dict):
        err_console.print("[red]--config must be a JSON object, e.g. '{\"lr\": 0.001}'[/red]")
        raise typer.Exit(code=2)
    return value


def split_names(values: list[str] | None) -> tuple[str, ...]:
    """Accept repeated options and comma-separated lists alike; ``all`` means every corruption."""
    names = [n.strip() for v in values or [] for n in v.split(",") if n.strip()]
    return () if names == ["all"] else tuple(names)


def default_settings() -> Settings:
    """The server settings (``TTA_*`` variables) supply the default data and models folders."""
    try:
        return Settings()
    except ValidationError as exc:
        err_console.print(f"[red]invalid TTA_* setting:[/red] {exc}")
        raise typer.Exit(code=2) from None


def eval_command(
    model: Annotated[str, typer.Option(help="catalogue model name (see `tta-server models`)")],
    method: Annotated[str, typer.Option(help="adaptation method (adapter registry name), e.g. source, bn")],
    out: Annotated[Path, typer.Option(help="folder for <run>.json and <run>.md")],
    config: Annotated[str | None, typer.Option(help="method config as a JSON object or a JSON file")] = None,
    setting: Annotated[Setting, typer.Option(help="stream setting")] = Setting.IID,
    batch_size: Annotated[int, typer.Option(min=1, help="images per adaptation step (1 = one image per request)")] = 64,
    severity: Annotated[int, typer.Option(min=0, max=5, help="1-5; 0 = clean images")] = 5,
    corruptions: Annotated[
        list[str] | None,
        typer.Option(help="corruptions to run (repeat or comma-separate; default all 15; 'none' = clean)"),
    ] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="use a seeded random subset of this many images")] = None,
    seed: Annotated[int, typer.Option(help="seeds corruptions, stream order and the method")] = 0,
    stream_seed: Annotated[
        int | None,
        typer.Option(help="seeds the subset, corruptions and stream order (then --seed seeds only the method)"),
    ] = None,
    delta: Annotated[float, typer.Option(help="Dirichlet delta of the correlated setting")] = DEFAULT_DIRICHLET_DELTA,
    data: Annotated[
        Path | None,
        typer.Option(help="ImageFolder directory or .npz (x uint8 NHWC, y) [default <TTA_DATA_DIR>/cifar10-jpeg/test]"),
    ] = None,
    models_dir: Annotated[Path | None, typer.Option(help="third-party weights folder [env TTA_MODELS_DIR]")] = None,
    model_config_file: Annotated[Path | None, typer.Option("--model-config", help="bring-your-own models JSON")] = None,
    cache_dir: Annotated[
        Path | None, typer.Option(help="cache root [default $TTA_CACHE_DIR or ~/.cache/tta-server]")
    ] = None,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="keep corrupted sets in a temporary folder")] = False,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda")] = "auto",
    threads: Annotated[int | None, typer.Option(min=1, help="torch CPU threads [default: torch's choice]")] = None,
) -> None:
    """Measure a method's accuracy on a corrupted test stream (CIFAR-10-C protocol, generated on the fly)."""
    # Imported here so that `tta-server --help` and `serve` do not load SciPy and the harness.
    from adapters.errors import AdapterError
    from tta_server.data.datasets import DatasetError
    from tta_server.devices import DeviceError, resolve_device
    from tta_server.evaluation.harness import EvalError, EvalSpec, run_eval
    from tta_server.evaluation.results import run_markdown, write_result
    from tta_server.shift.domains import CorruptionError
    from tta_server.shift.streams import StreamError
    from tta_server.zoo.catalogue import CatalogueError

    if console.is_terminal:  # log lines go above the progress bar instead of through it
        logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[RichHandler(console=console)])
    else:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = default_settings()
    try:
        resolved_device = resolve_device(device)
    except DeviceError as exc:
        err_console.print(f"[red]cannot evaluate:[/red] {exc}")
        raise typer.Exit(code=2) from None
    spec = EvalSpec(
        model=model,
        method=method,
        data=data if data is not None else settings.data_dir / DEFAULT_TEST_SET,
        models_dir=models_dir if models_dir is not None else settings.models_dir,
        setting=setting,
        batch_size=batch_size,
        severity=severity,
        corruptions=split_names(corruptions),
        method_config=parse_config(config),
        limit=limit,
        seed=seed,
        stream_seed=stream_seed,
        dirichlet_delta=delta,
        model_config_file=model_config_file,
        cache_dir=cache_dir,
        persistent_cache=not no_cache,
        device=resolved_device,
        threads=threads,
        command="tta-server " + shlex.join(sys.argv[1:]),
    )
    try:
        if console.is_terminal:
            columns = (
                TextColumn("{task.description:<22}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
            )
            with Progress(*columns, console=console) as bar:
                result = run_eval(spec, RichProgress(bar))
        else:
            result = run_eval(spec, LogProgress())
    except (EvalError, CatalogueError, AdapterError, DatasetError, CorruptionError, StreamError) as exc:
        err_console.print(f"[red]cannot evaluate:[/red] {exc}")
        raise typer.Exit(code=2) from None
    json_path, md_path = write_result(result, out)
    console.print(run_markdown(result), markup=False, highlight=False)
    console.print(f"wrote {json_path} and {md_path}")


def report_command(
    folders: Annotated[list[Path], typer.Argument(help="folders (or files) of eval results")],
    out: Annotated[Path | None, typer.Option(help="write the Markdown here (default: print it)")] = None,
    plots: Annotated[Path | None, typer.Option(help="folder for PNG plots (linked from the Markdown)")] = None,
) -> None:
    """Aggregate eval runs into method x setting x batch-size tables, with plots."""
    from tta_server.evaluation.report import ReportError, build_report, load_results

    try:
        results = load_results(folders)
    except ReportError as exc:
        err_console.print(f"[red]{exc}[/red]")
        raise typer.Exit(code=2) from None
    markdown = build_report(results, out, plots)
    if out is None:
        console.print(markdown, markup=False, highlight=False)
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(markdown)
    console.print(f"wrote {out} ({len(results)} runs)")
