"""Aggregate eval runs into method x setting x batch-size tables and draw the plots.

Runs are grouped by what makes numbers comparable: the model, the dataset (fingerprint), and
the severity. Within a group every row is one (method, setting, batch size); runs that differ
only in the seed are averaged and their seeds listed. Plots use matplotlib's Agg backend (no
display needed): per (setting, batch size), error per corruption with one bar per method,
and online accuracy along the stream with one line per method.
"""

from __future__ import annotations

import math
import os
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tta_server.evaluation.results import EvalResult, fmt, read_result
from tta_server.shift.domains import CLEAN, CORRUPTIONS
from tta_server.shift.streams import Setting

SETTING_ORDER = [s.value for s in Setting]
SHORT = {
    "gaussian_noise": "gauss",
    "shot_noise": "shot",
    "impulse_noise": "impul",
    "defocus_blur": "defoc",
    "glass_blur": "glass",
    "motion_blur": "motn",
    "zoom_blur": "zoom",
    "snow": "snow",
    "frost": "frost",
    "fog": "fog",
    "brightness": "brit",
    "contrast": "contr",
    "elastic_transform": "elast",
    "pixelate": "pixel",
    "jpeg_compression": "jpeg",
    CLEAN: "clean",
}
"""Column headers short enough for a 15-corruption table to fit a page (the tent paper's abbreviations)."""


class ReportError(ValueError):
    """No eval results were found in the given folders."""


@dataclass(frozen=True)
class GroupKey:
    """What makes runs comparable. ``n`` and ``n_source`` follow from the fingerprint (a seeded
    subset has its own), so they do not split groups further; they only make the title say
    which images a table is about."""

    model: str
    dataset: str
    fingerprint: str
    severity: int
    n: int = 0
    n_source: int = 0

    @property
    def data_name(self) -> str:
        """The dataset's last two path parts (``cifar10-jpeg/test``): enough to tell sets apart."""
        return "/".join(Path(self.dataset).parts[-2:]) or self.dataset

    def title(self) -> str:
        """The section heading: model, data, severity, and the subset when the runs used one.

        Two groups that differ only in their images (all 10,000 test images against a seeded
        1,000-image subset for batch size 1) would otherwise get the same heading.
        """
        data = self.data_name
        level = "clean images" if self.severity == 0 else f"severity {self.severity}"
        title = f"{self.model} on {data}, {level}"
        if 0 < self.n < self.n_source:
            title += f", seeded subset of {self.n:,} of {self.n_source:,} images per corruption"
        elif self.n:
            title += f", all {self.n:,} images per corruption"
        return title


@dataclass(frozen=True)
class Row:
    """One table row: the mean over seeds of runs that share method, setting and batch size."""

    method: str
    setting: str
    batch_size: int
    runs: tuple[EvalResult, ...]

    def error(self, corruption: str) -> float | None:
        values = [d.error for r in self.runs for d in r.domains if d.corruption == corruption]
        return float(np.mean(values)) if values else None

    @property
    def mean_error(self) -> float:
        return float(np.mean([r.mean_error for r in self.runs]))

    @property
    def mean_spread(self) -> float | None:
        """Sample standard deviation of the mean error over the row's runs (None for a single run)."""
        if len(self.runs) < 2:
            return None
        return float(np.std([r.mean_error for r in self.runs], ddof=1))

    @property
    def seeds(self) -> str:
        seeds = ",".join(str(s) for s in sorted({r.seed for r in self.runs}))
        streams = sorted({r.stream_seed for r in self.runs if r.stream_seed is not None})
        return seeds + (f" (stream {','.join(map(str, streams))})" if streams else "")


def load_results(folders: Iterable[Path]) -> list[EvalResult]:
    """Every eval result JSON under ``folders`` (recursively); other JSON files are skipped."""
    results = []
    for folder in folders:
        paths = [folder] if folder.is_file() else sorted(folder.rglob("*.json"))
        for path in paths:
            result = read_result(path)
            if result is not None:
                results.append(result)
    if not results:
        raise ReportError(f"no tta-server eval results (*.json) found in {', '.join(map(str, folders))}")
    return results


def method_order(label: str) -> tuple[int, str]:
    """``source`` first (the baseline row), then alphabetical."""
    return (0 if label == "source" else 1, label)


def group_rows(results: Sequence[EvalResult]) -> dict[GroupKey, list[Row]]:
    """Rows per comparable group, sorted by setting (protocol order), batch size (large first), method."""
    buckets: dict[GroupKey, dict[tuple[str, str, int], list[EvalResult]]] = defaultdict(lambda: defaultdict(list))
    for r in results:
        key = GroupKey(r.model.name, r.dataset.path, r.dataset.fingerprint, r.severity, r.dataset.n, r.dataset.n_source)
        buckets[key][(r.method_label, r.setting, r.batch_size)].append(r)
    grouped = {}
    for key, rows in buckets.items():
        ordered = sorted(
            rows.items(),
            key=lambda item: (
                SETTING_ORDER.index(item[0][1]) if item[0][1] in SETTING_ORDER else 99,
                -item[0][2],
                method_order(item[0][0]),
            ),
        )
        grouped[key] = [Row(m, s, b, tuple(runs)) for (m, s, b), runs in ordered]
    return dict(sorted(grouped.items(), key=lambda kv: (kv[0].model, kv[0].dataset, -kv[0].severity)))


def columns(rows: Sequence[Row]) -> list[str]:
    """The corruptions present in any row, in protocol order (``none`` last)."""
    present = {d.corruption for row in rows for r in row.runs for d in r.domains}
    return [c for c in (*CORRUPTIONS, CLEAN) if c in present]


def table(rows: Sequence[Row]) -> str:
    """Markdown table: method | setting | batch | per-corruption error % | mean (± sd over seeds) | seeds."""
    cols = columns(rows)
    head = ["method", "setting", "batch", *(SHORT.get(c, c) for c in cols), "mean", "seeds", "img/s", "used %"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 3 + "---:|" * (len(cols) + 1) + "---|---:|---:|"]
    for row in rows:
        cells = [row.method, row.setting, str(row.batch_size)]
        for c in cols:
            e = row.error(c)
            cells.append(fmt(e) if e is not None else "-")
        speed = float(np.mean([r.timing.images_per_s for r in row.runs]))
        spread = row.mean_spread
        mean = f"**{fmt(row.mean_error)}**" + (f" ± {fmt(spread)}" if spread is not None else "")
        cells += [mean, row.seeds, f"{speed:.0f}", used_cell(row.runs)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def used_cell(runs: Sequence[EvalResult]) -> str:
    """Mean share of samples the updates used (CEMA: uploads), or '-' where it was not recorded."""
    ratios = [r.work.used_ratio for r in runs if r.work is not None]
    return f"{100 * float(np.mean(ratios)):.1f}" if ratios else "-"


def context_lines(results: Sequence[EvalResult]) -> list[str]:
    """Where and when the numbers were measured, and with which versions."""
    first = results[0]
    machines = sorted({f"{r.machine.get('processor', '?')} x{r.machine.get('cpu_count', '?')}" for r in results})
    devices = sorted({r.device for r in results})
    dates = sorted(r.started_at for r in results)
    return [
        f"- runs: {len(results)}, measured {dates[0][:10]} to {dates[-1][:10]} on {', '.join(machines)} "
        f"({', '.join(devices)}), torch {first.versions.get('torch', '?')}",
        "- error % per corruption (lower is better); mean = mean over the corruptions of the row; "
        "img/s = adaptation throughput (model input + adapter step); used % = share of the samples "
        "that updates used (CEMA: uploaded; SAR: passed the reliability filter; '-' = not recorded)",
    ]


def slug(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in text).strip("-")


def plot_group(key: GroupKey, rows: Sequence[Row], plots_dir: Path) -> list[Path]:
    """Bar chart of error per corruption and line chart of online accuracy, per (setting, batch size)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots_dir.mkdir(parents=True, exist_ok=True)
    written = []
    cols = columns(rows)
    by_stream: dict[tuple[str, int], list[Row]] = defaultdict(list)
    for row in rows:
        by_stream[(row.setting, row.batch_size)].append(row)
    base = slug(f"{key.model}-{key.data_name}-sev{key.severity}")
    for (setting, batch), members in by_stream.items():
        fig, ax = plt.subplots(figsize=(min(16.0, max(6.0, 0.35 * (len(cols) + 1) * len(members) + 3)), 3.6))
        width = 0.8 / len(members)
        xs = np.arange(len(cols) + 1)
        for i, row in enumerate(members):
            values = [row.error(c) or 0.0 for c in cols] + [row.mean_error]
            ax.bar(xs + (i - (len(members) - 1) / 2) * width, values, width, label=row.method)
        ax.set_xticks(xs, [SHORT.get(c, c) for c in cols] + ["mean"], rotation=45, ha="right")
        ax.set_ylabel("error %")
        ax.set_title(f"{key.title()} - {setting}, batch {batch}", fontsize=9)
        ax.set_ylim(top=ax.get_ylim()[1] * (1.15 + 0.07 * math.ceil(len(members) / 4)))  # room for the legend
        ax.legend(fontsize=7, ncol=min(4, len(members)), loc="upper center")
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        bars = plots_dir / f"{base}-{setting}-bs{batch}-errors.png"
        fig.savefig(bars, dpi=110)
        plt.close(fig)
        written.append(bars)

        fig, ax = plt.subplots(figsize=(7.0, 3.4))
        for row in members:
            curve = row.runs[0].curve
            if curve.positions:
                ax.plot(curve.positions, curve.window, label=row.method, linewidth=1)
        ax.set_xlabel("images seen")
        ax.set_ylabel("online accuracy % (per window)")
        ax.set_title(f"{key.title()} - {setting}, batch {batch} (seed {members[0].runs[0].seed})", fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        online = plots_dir / f"{base}-{setting}-bs{batch}-online.png"
        fig.savefig(online, dpi=110)
        plt.close(fig)
        written.append(online)
    return written


def build_report(results: Sequence[EvalResult], out: Path | None = None, plots_dir: Path | None = None) -> str:
    """The Markdown report (tables, and links to plots when ``plots_dir`` is given)."""
    lines = ["# Accuracy under distribution shift", "", *context_lines(results), ""]
    groups = group_rows(results)
    titles = Counter(key.title() for key in groups)
    for key, rows in groups.items():
        # still ambiguous (e.g. two different subsets of one size): name the data fingerprint
        title = key.title() if titles[key.title()] == 1 else f"{key.title()} (data {key.fingerprint[:8]})"
        lines += [f"## {title}", "", table(rows), ""]
        commands = sorted({r.command for row in rows for r in row.runs if r.command})
        if commands:
            lines += ["<details><summary>commands</summary>", "", *[f"    {c}" for c in commands], "", "</details>", ""]
        if plots_dir is not None:
            anchor = out.parent if out is not None else Path.cwd()
            for path in plot_group(key, rows, plots_dir):
                lines.append(f"![{path.stem}]({Path(os.path.relpath(path, anchor)).as_posix()})")
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"
