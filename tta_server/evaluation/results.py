"""The record one ``tta-server eval`` run writes: a validated JSON schema and its Markdown table.

The JSON is the source of truth (``tta-server report`` reads only it); the Markdown beside
it is for a person skimming a results folder. Errors and accuracies are percentages.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from adapters.registry import method_class

SCHEMA = "tta-server.eval/1"


class Frozen(BaseModel):
    """Results are facts: immutable, and unknown fields are rejected when read back."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class DomainScore(Frozen):
    """Accuracy on one domain (a corruption at a severity, or ``none``)."""

    corruption: str
    severity: int
    n: int = Field(ge=0)
    correct: int = Field(ge=0)
    accuracy: float = Field(description="percent")
    error: float = Field(description="percent")


class Curve(Frozen):
    """Online accuracy sampled along the stream (``positions`` = images seen so far).

    ``cumulative`` is the accuracy over everything seen so far; ``window`` the accuracy over
    the images since the previous sample point; ``domain`` the domain of the last image.
    """

    positions: list[int]
    cumulative: list[float]
    window: list[float]
    domain: list[str]


class DatasetInfo(Frozen):
    path: str
    fingerprint: str
    n_source: int = Field(description="images in the source dataset before --limit")
    n: int = Field(description="images used per domain")
    image_size: tuple[int, int]
    classes: int


class ModelInfo(Frozen):
    name: str
    arch: str
    sha256: str


class Work(Frozen):
    """What the adapter reported over the whole run, summed over steps.

    ``samples_used`` counts the samples an update actually used (for CEMA: the uploads to the
    server side), ``samples_filtered`` those a reliability or redundancy filter excluded;
    ``forwards``/``backwards`` count passes, including replay and teacher batches.
    """

    steps: int = Field(ge=0)
    adapted_steps: int = Field(ge=0)
    samples: int = Field(ge=0)
    samples_used: int = Field(ge=0)
    samples_filtered: int = Field(ge=0)
    forwards: int = Field(ge=0)
    backwards: int = Field(ge=0)

    @property
    def used_ratio(self) -> float:
        """Share of the stream's samples an update used (CEMA's upload ratio)."""
        return self.samples_used / max(self.samples, 1)


class Timing(Frozen):
    """Seconds of wall time; ``images_per_s`` counts adaptation steps only (no data generation)."""

    wall_s: float
    data_s: float = Field(description="loading and corrupting (or reading cached) images")
    adapt_s: float = Field(description="model input preparation plus adapter steps")
    images_per_s: float


class EvalResult(Frozen):
    """Everything one run measured, and enough context to rerun it."""

    schema_: Literal["tta-server.eval/1"] = Field("tta-server.eval/1", alias="schema")
    model: ModelInfo
    method: str
    method_config: dict[str, Any]
    config_overrides: dict[str, Any]
    auxiliary_models: dict[str, ModelInfo]
    predicts: str
    setting: str
    batch_size: int
    severity: int
    dirichlet_delta: float | None
    seed: int
    stream_seed: int | None = Field(None, description="the data's seed when it differs from the method's `seed`")
    limit: int | None
    dataset: DatasetInfo
    domains: list[DomainScore]
    mean_error: float
    mean_accuracy: float
    n_images: int
    n_batches: int
    resets: int
    timing: Timing
    work: Work | None = Field(None, description="absent in records written before it was measured")
    curve: Curve
    device: str
    threads: int
    versions: dict[str, str]
    machine: dict[str, str]
    started_at: str
    command: str

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    def label_config(self) -> dict[str, Any]:
        """The config fields that tell this run apart: its overrides, plus every field of its recorded
        config that differs from the method's current default (a run written before a default changed
        keeps the value it ran with in its label, instead of joining the rows of the new default, and an
        override that is the default today no longer splits a row)."""
        try:
            config_cls = method_class(self.method).config_cls
        except Exception:  # a method this checkout does not register: the overrides alone
            return dict(self.config_overrides)
        defaults = config_cls().model_dump(mode="json")
        shown = {k: v for k, v in self.config_overrides.items() if k not in defaults or defaults[k] != v}
        recorded = {**config_cls.legacy_values, **self.method_config} if self.method_config else {}
        for key, value in recorded.items():
            if key in defaults and defaults[key] != value and key not in shown:
                shown[key] = value
        return shown

    @property
    def method_label(self) -> str:
        """The method name plus its non-default config, short enough for a table cell.

        Long overrides are shortened to a hash so that variants still stay apart.
        """
        config = self.label_config()
        if not config:
            return self.method
        shown = ", ".join(f"{k}={v}" for k, v in sorted(config.items()))
        if len(shown) <= 40:
            return f"{self.method}({shown})"
        return f"{self.method}[{self._config_digest(config)}]"

    def _config_digest(self, config: dict[str, Any] | None = None) -> str:
        chosen = self.config_overrides if config is None else config
        return hashlib.sha256(json.dumps(chosen, sort_keys=True).encode()).hexdigest()[:6]

    def stem(self) -> str:
        """File name (without suffix) that distinguishes runs written into one folder."""
        label = f"{self.method}-{self._config_digest()}" if self.config_overrides else self.method
        seeds = f"seed{self.seed}" + ("" if self.stream_seed is None else f"_stream{self.stream_seed}")
        return f"{self.model.name}_{label}_{self.setting}_bs{self.batch_size}_sev{self.severity}_{seeds}"

    def to_json(self) -> str:
        return self.model_dump_json(by_alias=True, indent=2)


def read_result(path: Path) -> EvalResult | None:
    """Parse a result file; ``None`` for JSON that is not an eval result (other files in the folder)."""
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(raw, dict) or raw.get("schema") != SCHEMA:
        return None
    return EvalResult.model_validate(raw)


def fmt(value: float) -> str:
    return f"{value:.1f}"


def run_markdown(result: EvalResult) -> str:
    """A per-run summary: context lines, then corruption | error | accuracy | n."""
    lines = [
        f"# {result.model.name} / {result.method_label} / {result.setting} / batch {result.batch_size}",
        "",
        f"- command: `{result.command}`",
        f"- data: `{result.dataset.path}` ({result.dataset.n} of {result.dataset.n_source} images per domain), "
        f"severity {result.severity}, seed {result.seed}",
        f"- model sha256 `{result.model.sha256[:16]}`, "
        f"method config `{json.dumps(result.method_config, sort_keys=True)}`",
        f"- {result.n_images} images in {result.n_batches} batches, {result.resets} resets; "
        f"wall {result.timing.wall_s:.1f} s (data {result.timing.data_s:.1f} s, adapt {result.timing.adapt_s:.1f} s), "
        f"{result.timing.images_per_s:.0f} images/s on {result.device} ({result.threads} threads)",
        f"- {result.started_at}, torch {result.versions.get('torch', '?')}, "
        f"tta-server {result.versions.get('tta-server', '?')}",
        *work_lines(result.work),
        "",
        "| corruption | error % | accuracy % | n |",
        "|---|---:|---:|---:|",
    ]
    for d in result.domains:
        lines.append(f"| {d.corruption} | {fmt(d.error)} | {fmt(d.accuracy)} | {d.n} |")
    lines.append(f"| **mean** | **{fmt(result.mean_error)}** | **{fmt(result.mean_accuracy)}** | {result.n_images} |")
    return "\n".join(lines) + "\n"


def work_lines(work: Work | None) -> list[str]:
    """One context line on what the adapter did (absent in records that predate the count)."""
    if work is None:
        return []
    return [
        f"- adapter work: {work.adapted_steps} of {work.steps} steps adapted; "
        f"{work.samples_used} of {work.samples} samples used by updates ({100 * work.used_ratio:.1f}%), "
        f"{work.samples_filtered} filtered out; {work.forwards / max(work.steps, 1):.2f} forwards and "
        f"{work.backwards / max(work.steps, 1):.2f} backwards per batch"
    ]


def write_result(result: EvalResult, out_dir: Path) -> tuple[Path, Path]:
    """Write ``<stem>.json`` and ``<stem>.md`` into ``out_dir``; returns both paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"{result.stem()}.json"
    md_path = json_path.with_suffix(".md")
    json_path.write_text(result.to_json() + "\n")
    md_path.write_text(run_markdown(result))
    return json_path, md_path
