"""``auto`` against ``source`` and the best single method of every benchmark setting, from eval records.

    .venv/bin/python -m benchmarks.auto_targets benchmarks/results/shift

Reads every ``tta-server eval`` record under the given folders, groups them as the report does
(model, images, severity; then setting and batch size) and, for every setting that has both an
``auto`` and a ``source`` run, prints the mean errors and the two targets of issue 17: ``auto``
no more than 0.5 points worse than ``source`` and no more than 2 points worse than the best
single method run in that setting (``source`` included; ``auto`` excluded). Writes the table to
``benchmarks/results/auto_targets.md`` as well.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from tta_server.evaluation.report import SETTING_ORDER, GroupKey, Row, group_rows, load_results

SOURCE_MARGIN = 0.5
BEST_MARGIN = 2.0


@dataclass(frozen=True)
class Verdict:
    """One setting's comparison."""

    group: GroupKey
    setting: str
    batch_size: int
    source: float
    auto: float
    best_label: str
    best: float
    others: int

    @property
    def versus_source(self) -> float:
        return self.auto - self.source

    @property
    def versus_best(self) -> float:
        return self.auto - self.best

    @property
    def met(self) -> bool:
        return self.versus_source <= SOURCE_MARGIN and self.versus_best <= BEST_MARGIN


def verdicts(groups: dict[GroupKey, list[Row]]) -> list[Verdict]:
    """Every (group, setting, batch size) with an ``auto`` and a ``source`` row."""
    out = []
    for key, rows in groups.items():
        settings = sorted(
            {(r.setting, r.batch_size) for r in rows},
            key=lambda sb: (SETTING_ORDER.index(sb[0]) if sb[0] in SETTING_ORDER else 99, -sb[1]),
        )
        for setting, batch in settings:
            here = [r for r in rows if r.setting == setting and r.batch_size == batch]
            auto = next((r for r in here if r.method == "auto"), None)
            source = next((r for r in here if r.method == "source"), None)
            if auto is None or source is None:
                continue
            singles = [r for r in here if r.method != "auto"]
            best = min(singles, key=lambda r: r.mean_error)
            out.append(
                Verdict(
                    key,
                    setting,
                    batch,
                    source.mean_error,
                    auto.mean_error,
                    best.method,
                    best.mean_error,
                    len(singles),
                )
            )
    return out


def markdown(found: list[Verdict]) -> str:
    head = (
        "| model | images | setting | batch | `source` | `auto` | best single method run here | methods run | "
        "`auto` − `source` | `auto` − best | met |"
    )
    lines = [head, "|---|---|---|---:|---:|---:|---|---:|---:|---:|---|"]
    for v in found:
        images = "clean" if v.group.severity == 0 else f"{v.group.n:,} per corruption, severity {v.group.severity}"
        lines.append(
            f"| {v.group.model} | {images} | {v.setting} | {v.batch_size} | {v.source:.1f} | **{v.auto:.1f}** | "
            f"`{v.best_label}` {v.best:.1f} | {v.others} | {v.versus_source:+.1f} | {v.versus_best:+.1f} | "
            f"{'yes' if v.met else '**no**'} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/auto_targets.md"))
    args = parser.parse_args(argv)
    found = verdicts(group_rows(load_results(args.folders)))
    text = markdown(found)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        "# `auto` against `source` and the best single method (mean error %, lower is better)\n\n"
        f"`python -m benchmarks.auto_targets {' '.join(map(str, args.folders))}`; targets: `auto` − `source` "
        f"≤ {SOURCE_MARGIN} and `auto` − best ≤ {BEST_MARGIN} points.\n\n" + text
    )
    sys.stdout.write(text)
    return 0 if all(v.met for v in found) else 1


if __name__ == "__main__":
    raise SystemExit(main())
