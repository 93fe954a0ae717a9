"""Micro-benchmark of ``Adapter.step_many``: many one-image streams, fused against one step per stream.

    .venv/bin/python -m benchmarks.fused_step --segments 64 --reps 7

For each method, ``--segments`` streams send one image each (CIFAR-sized noise; the figure is
about cost, not accuracy). Three variants, timed on one torch thread with the repetitions
interleaved (A, B, C, A, B, C, ...) so that a neighbour's load hits all of them alike:

- ``fused``: ``adapter.step_many`` (one forward over all segments where the method fuses);
- ``per-segment``: the base-class default, ``step`` once per segment;
- ``raw``: one forward of the plain model over the same images as a single batch (the floor).

Prints images/s per variant (median over repetitions, with the min-max range) and the ratio of
fused to per-segment. Loads ``resnet20`` from the catalogue when its weights are present,
otherwise builds an untrained ResNet-20 (the same cost).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from adapters import Adapter, Segment, create_adapter
from tta_server.allocator import keep_freed_memory

DEFAULT_METHODS = ("source", "bn", "alpha_bn", "unmix_tns", "tent")


def load_model(models_dir: Path) -> tuple[str, nn.Module]:
    """The catalogue's resnet20 if loadable, else an untrained CIFAR ResNet-20 (same architecture)."""
    try:
        from tta_server.zoo.catalogue import build_catalogue

        return "resnet20 (catalogue weights)", build_catalogue(models_dir, None).load("resnet20", "cpu").model
    except Exception as exc:  # any failure means: fall back to the untrained twin
        from tta_server.zoo.resnet_cifar import CifarResNet

        print(f"catalogue resnet20 not loadable ({exc}); using an untrained ResNet-20", file=sys.stderr)  # noqa: T201
        return "ResNet-20 (untrained)", CifarResNet(20).eval().requires_grad_(False)


def timed(fn: Callable[[], object]) -> float:
    """Wall seconds of one call."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_method(name: str, model: nn.Module, images: torch.Tensor, reps: int) -> dict[str, list[float]]:
    """Images/s of every repetition of the three variants, interleaved."""
    adapter = create_adapter(name)
    prepared = adapter.prepare(model)
    adapter.check_model(prepared)
    segments = [Segment(images[i : i + 1], adapter.init_state(prepared, seed=i)) for i in range(len(images))]

    def raw() -> object:
        with torch.no_grad():
            return model(images)

    variants: dict[str, Callable[[], object]] = {
        "fused": lambda: adapter.step_many(prepared, segments),
        "per-segment": lambda: Adapter.step_many(adapter, prepared, segments),
        "raw": raw,
    }
    for fn in variants.values():  # warm-up
        fn()
    rates: dict[str, list[float]] = {key: [] for key in variants}
    for _ in range(reps):
        for key, fn in variants.items():
            rates[key].append(len(images) / timed(fn))
    return rates


def summary(values: list[float]) -> str:
    """Median with the min-max range, in images/s."""
    return f"{statistics.median(values):8.0f} ({min(values):.0f}-{max(values):.0f})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--segments", type=int, default=64, help="streams, one image each")
    parser.add_argument("--reps", type=int, default=7, help="interleaved repetitions per variant")
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS))
    parser.add_argument("--models-dir", type=Path, default=Path("../shared/models"))
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    keep_freed_memory()  # the server's allocator setting
    torch.manual_seed(0)
    label, model = load_model(args.models_dir)
    images = torch.randn(args.segments, 3, 32, 32)
    print(f"{label}, {args.segments} segments x 1 image, {args.threads} thread(s), {args.reps} reps")  # noqa: T201
    print(f"{'method':<10} {'fused img/s':>24} {'per-segment img/s':>24} {'raw batch img/s':>24} {'fused/per-seg':>14}")  # noqa: T201
    for name in args.methods:
        rates = bench_method(name, model, images, args.reps)
        ratio = statistics.median(rates["fused"]) / statistics.median(rates["per-segment"])
        row = f"{name:<10} {summary(rates['fused']):>24} {summary(rates['per-segment']):>24}"
        print(f"{row} {summary(rates['raw']):>24} {ratio:>13.1f}x")  # noqa: T201
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
