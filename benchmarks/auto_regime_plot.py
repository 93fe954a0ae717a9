"""Plot the regime of an ``auto`` stream over time, from ``tta-server eval`` run in process.

Why a separate script: the eval record keeps accuracy and summed work, not each step's
``StepInfo.extra``; this wraps the harness's per-step work counter to collect the regime of
every step, runs the same ``eval`` command, and writes a step plot of regime against images seen.

    python -m benchmarks.auto_regime_plot docs/plots/auto-shifting-regime.png --model resnet20 \
        --method auto --setting shifting --batch-size 64 --corruptions gaussian_noise,frost,jpeg_compression \
        --limit 1000 --seed 0 --threads 1 --out /tmp/auto-regime
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from typer.testing import CliRunner

from adapters.auto import REGIME_NAMES
from adapters.base import StepInfo
from tta_server.cli import app
from tta_server.evaluation import harness


def main(argv: list[str]) -> None:
    """``argv``: the PNG path, then the arguments of ``tta-server eval``."""
    out, eval_args = Path(argv[0]), argv[1:]
    steps: list[tuple[int, float]] = []
    original = harness.WorkCounter.add

    def add(self: harness.WorkCounter, info: StepInfo) -> None:
        original(self, info)
        steps.append((info.samples, info.extra.get("regime", float("nan"))))

    harness.WorkCounter.add = add  # type: ignore[method-assign]
    try:
        result = CliRunner().invoke(app, ["eval", *eval_args])
    finally:
        harness.WorkCounter.add = original  # type: ignore[method-assign]
    sys.stdout.write(result.output[-600:] + "\n")
    if result.exit_code != 0 or not steps:
        raise SystemExit(result.exit_code or 1)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seen = np.cumsum([n for n, _ in steps])
    regime = np.array([r for _, r in steps])
    fig, ax = plt.subplots(figsize=(9, 2.6), constrained_layout=True)
    ax.step(seen, regime, where="post", lw=1.2)
    ax.set_yticks(list(REGIME_NAMES), list(REGIME_NAMES.values()))
    ax.set_ylim(-0.5, len(REGIME_NAMES) - 0.5)
    ax.set_xlabel("images seen")
    ax.grid(alpha=0.3)
    ax.set_title("auto: regime per batch; " + " ".join(eval_args), fontsize=7, wrap=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    counts = {REGIME_NAMES[k]: int((regime == k).sum()) for k in REGIME_NAMES}
    sys.stdout.write(f"{counts} in {len(regime)} steps\n")


if __name__ == "__main__":
    main(sys.argv[1:])
