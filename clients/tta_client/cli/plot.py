"""The replay plot: online accuracy over the stream, and prediction entropy per batch.

Accuracy is drawn twice per run, at the end of each batch (a batch is predicted at once, so
finer points would be artefacts): cumulative (what the whole replay scored so far) and over a
sliding window (what the stream scores *now*, which is where adaptation shows). The entropy
panel is the label-free drift signal a production stream has instead of accuracy. Streams of the
``auto`` method add a third panel: the regime each batch was predicted in, over the stream.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt


@dataclass
class Curve:
    """One run's per-image correctness and per-batch mean entropy, in replay order."""

    label: str
    correct: npt.NDArray[np.bool_]
    batch_ends: list[int]
    batch_entropy: list[float]
    batch_regime: list[str | None] = field(default_factory=list)
    """Per batch, the regime an ``auto`` stream reported (empty or all None for other methods)."""

    def cumulative(self) -> npt.NDArray[np.float64]:
        totals: npt.NDArray[np.float64] = np.cumsum(self.correct) / np.arange(1, len(self.correct) + 1)
        return totals

    def windowed(self, window: int) -> npt.NDArray[np.float64]:
        """Accuracy over the last ``window`` images at each point (fewer at the start)."""
        sums = np.concatenate([[0], np.cumsum(self.correct)])
        ends = np.arange(1, len(self.correct) + 1)
        starts = np.maximum(0, ends - window)
        rates: npt.NDArray[np.float64] = (sums[ends] - sums[starts]) / (ends - starts)
        return rates


def plot_replay(curves: list[Curve], window: int, title: str, path: Path) -> None:
    """Write the PNG at ``path`` (matplotlib, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    regimes = sorted({r for c in curves for r in c.batch_regime if r is not None})
    rows, ratios = (3, [3, 1.4, 1.0]) if regimes else (2, [3, 1.4])
    fig, axes = plt.subplots(
        rows,
        1,
        figsize=(9, 6.2 + 1.6 * (rows - 2)),
        sharex=True,
        gridspec_kw={"height_ratios": ratios},
        constrained_layout=True,
    )
    acc_ax, ent_ax = axes[0], axes[1]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, curve in enumerate(curves):
        color = colors[i % len(colors)]
        ends = np.asarray(curve.batch_ends)
        cumulative = curve.cumulative()[ends - 1]
        acc_ax.plot(ends, 100 * cumulative, color=color, lw=2, marker=".", label=f"{curve.label}: cumulative")
        acc_ax.plot(
            ends, 100 * curve.windowed(window)[ends - 1], color=color, lw=1, ls="--", label=f"last {window} images"
        )
        acc_ax.annotate(
            f"{100 * cumulative[-1]:.1f}%",
            (ends[-1], 100 * cumulative[-1]),
            xytext=(5, 0),
            textcoords="offset points",
            va="center",
            color=color,
            fontsize=9,
        )
        ent_ax.plot(ends, curve.batch_entropy, color=color, lw=1.2, marker=".", label=curve.label)
        if regimes and any(r is not None for r in curve.batch_regime):
            level = [regimes.index(r) if r is not None else np.nan for r in curve.batch_regime]
            axes[2].step(ends, level, where="post", color=color, lw=1.5, label=curve.label)
    if regimes:
        axes[2].set_yticks(range(len(regimes)), regimes)
        axes[2].set_ylim(-0.5, len(regimes) - 0.5)
        axes[2].set_ylabel("auto regime")
        axes[2].grid(alpha=0.3)
    acc_ax.set_ylabel("top-1 accuracy (%)")
    acc_ax.set_ylim(0, 100)
    acc_ax.grid(alpha=0.3)
    acc_ax.legend(loc="lower right", fontsize=8, ncol=max(1, len(curves)))
    acc_ax.set_title(title, fontsize=10)
    acc_ax.set_xlim(0, max(c.batch_ends[-1] for c in curves) * 1.1)
    ent_ax.set_ylabel("mean entropy\nper batch (nats)")
    axes[-1].set_xlabel("images seen")
    ent_ax.grid(alpha=0.3)
    ent_ax.set_ylim(bottom=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
