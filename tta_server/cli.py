"""The ``tta-server`` command line: ``serve``, ``models`` and ``train``.

Settings come from ``TTA_*`` environment variables; a flag given on the command line wins.
An invalid value exits with status 2 and a message naming the setting.
"""

from __future__ import annotations

import inspect
import json
import logging
import logging.config
from enum import Enum, StrEnum
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import typer
from pydantic import ValidationError
from pydantic.fields import FieldInfo
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from tta_server.evaluation.cli import eval_command, report_command
from tta_server.observability.logs import logging_config
from tta_server.settings import Settings
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


FLAG_NAMES = {"store_url": "--store", "model_config_file": "--model-config"}
"""Settings whose ``serve`` flag is not simply ``--<field-name>`` (kept short and stable)."""

ENV_ONLY = {
    "api_keys": "secrets: a command line is visible to every user of the host (ps, /proc, shell history)",
}
"""Settings that deliberately have no ``serve`` flag, and why (the README lists them too)."""


DESCRIPTIONS = {
    "host": "bind address",
    "port": "TCP port",
    "device": "where models run: auto (CUDA when present), cpu or cuda",
    "log_level": "log level",
    "default_model": "a catalogue model name; no part of the server reads it at present",
    "max_images_per_request": "images in one request (413 beyond)",
}
"""Help for settings whose Field has no description."""


def _shown(value: object) -> str:
    """A setting's default as a user would type it in the variable."""
    if value is None:
        return "none"
    if isinstance(value, Enum):
        return str(value.value)
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


def _serve_parameter(name: str, field: FieldInfo) -> inspect.Parameter:
    """One ``serve`` option for the setting ``name``: its flag, type, choices, default and variable in the help.

    The option's own default is None ("not given"), so that an unset flag leaves the
    environment variable or the setting's default in charge; the real default is shown in the
    help text instead. Lists and objects take the same JSON as their variable.
    """
    annotation: Any = field.annotation
    if get_origin(annotation) in (Union, UnionType):
        annotation = next(a for a in get_args(annotation) if a is not type(None))
    if get_origin(annotation) is Literal:  # typer offers choices for enums: make one of the literal values
        choices: dict[str, str] = {str(v): str(v) for v in get_args(annotation)}
        annotation = StrEnum(f"{name}_choices", choices)  # type: ignore[misc,no-redef]
    elif isinstance(annotation, type) and issubclass(annotation, Enum):
        pass
    elif annotation not in (str, int, float, bool, Path):
        annotation = str  # JSON, parsed in serve()
    env = f"TTA_{name.upper()}"
    default = _shown(field.get_default(call_default_factory=True))
    description = (field.description or DESCRIPTIONS.get(name) or name.replace("_", " ")).rstrip(".")
    json_note = "; JSON" if name in _JSON_FIELDS else ""
    help_text = escape(f"{description}{json_note}. Default: {default}. Env: {env}")
    flag = FLAG_NAMES.get(name, "--" + name.replace("_", "-"))
    decls = [f"{flag}/--no-{flag[2:]}"] if annotation is bool else [flag]
    option = typer.Option(*decls, help=help_text, show_default=False, case_sensitive=False)
    return inspect.Parameter(
        name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[annotation | None, option]
    )


_JSON_FIELDS = {
    name
    for name, field in Settings.model_fields.items()
    if get_origin(field.annotation) in (list, dict) or field.annotation in (list, dict)
}


def serve(**flags: Any) -> None:
    """Run the HTTP server.

    Every setting is a flag or a TTA_<NAME> environment variable; a flag wins. Lists and
    objects take JSON, as their variables do. API keys are environment-only.
    """
    import uvicorn

    from tta_server.app import create_app

    overrides: dict[str, Any] = {}
    for name, given in flags.items():
        value = given.value if isinstance(given, Enum) else given
        if value is not None and name in _JSON_FIELDS:
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                flag = FLAG_NAMES.get(name, "--" + name.replace("_", "-"))
                err_console.print(f"[red]invalid setting {name} ({flag}):[/red] not valid JSON: {escape(str(exc))}")
                raise typer.Exit(code=2) from None
        overrides[name] = value
    settings = load_settings(**overrides)
    # one handler and format for the server and uvicorn (access log included), with request ids
    log_config = logging_config(settings.log_level, settings.log_format)
    logging.config.dictConfig(log_config)
    try:
        application = create_app(settings)
    except (ValueError, RuntimeError) as exc:
        err_console.print(f"[red]cannot start:[/red] {exc}")
        raise typer.Exit(code=2) from None
    uvicorn.run(
        application, host=settings.host, port=settings.port, log_level=settings.log_level, log_config=log_config
    )


# typer reads the options from the signature: one keyword parameter per setting that has a flag,
# built from Settings itself so that a new setting gets its flag (and help) without an edit here
setattr(  # noqa: B010 - mypy does not know __signature__ on functions
    serve,
    "__signature__",
    inspect.Signature(
        [_serve_parameter(n, f) for n, f in Settings.model_fields.items() if n not in ENV_ONLY],
        return_annotation=None,
    ),
)
app.command(help=serve.__doc__)(serve)


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
