"""Cost of every method on every catalogue model: passes per batch, state bytes, images/s.

    .venv/bin/python -m benchmarks.method_cost --threads 2 \\
        --out benchmarks/results/method_cost.json --markdown docs/cost.md

For each (model, method) pair the method supports, the benchmark prepares the method as the
server does, feeds ``--steps`` batches of CIFAR-10 test images with Gaussian noise (severity 5:
a shifted stream, so reliability filters and replay behave as they do in production) and
reports, per batch:

- ``forwards`` / ``backwards``: passes *counted* while the step runs (a forward hook on the
  edge model and on each auxiliary model, and a counting wrapper around
  ``torch.autograd.grad``, which every gradient method in ``adapters/`` uses), next to what the
  method itself reports in ``StepInfo``, so a method that miscounts shows up;
- ``state bytes``: the bytes of one stream's tensors at registration and after the run (CEMA's
  replay buffer grows until ``replay_buffer_size``);
- ``images/s``: in-process throughput after ``--warmup`` untimed batches, and its ratio to
  ``source`` on the same model and batch size.

Prints a Markdown table, writes JSON to ``--out`` and the table to ``--markdown``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import platform
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.progress import track
from torch import nn

from adapters import create_adapter
from adapters.base import Adapter, StreamState
from adapters.errors import AuxiliaryModelError, UnsupportedModelError
from adapters.registry import method_names
from tta_server.data.datasets import load_labeled_images
from tta_server.serving.method_setup import prepare_for_method
from tta_server.shift.corruptions import corrupt
from tta_server.zoo.catalogue import LoadedModel, build_catalogue
from tta_server.zoo.transforms import normalize, to_tensor_batch

DEFAULT_DATA = Path("../shared/data/cifar10_test_first846.npz")


@dataclass
class PassCounter:
    """Counts forward passes of hooked modules and calls of ``torch.autograd.grad``."""

    forwards: dict[str, int]
    backwards: int = 0

    def hook(self, role: str, module: nn.Module) -> torch.utils.hooks.RemovableHandle:
        self.forwards.setdefault(role, 0)

        def count(*_: object) -> None:
            self.forwards[role] += 1

        return module.register_forward_hook(count)

    @contextlib.contextmanager
    def counting_backwards(self) -> Iterator[None]:
        """Wrap ``torch.autograd.grad`` (looked up at call time by the adapters) while active."""
        original = torch.autograd.grad

        def grad(*args: Any, **kwargs: Any) -> Any:
            self.backwards += 1
            return original(*args, **kwargs)

        torch.autograd.grad = grad
        try:
            yield
        finally:
            torch.autograd.grad = original


@dataclass
class CostRow:
    """One (model, method, batch size) measurement; counts are per batch."""

    model: str
    method: str
    config: dict[str, Any]
    batch_size: int
    steps: int
    forwards: dict[str, float]
    backwards: float
    reported_forwards: float
    reported_backwards: float
    state_bytes_initial: int
    state_bytes_final: int
    images_per_s: float
    ratio_to_source: float | None = None


def measure(
    name: str,
    model: nn.Module,
    adapter: Adapter[Any],
    auxiliary: dict[str, nn.Module],
    batches: Sequence[torch.Tensor],
    warmup: int,
) -> CostRow:
    """Run ``adapter`` over ``batches`` (the first ``warmup`` untimed) and count what it costs.

    ``auxiliary`` maps role -> *unprepared* model for the roles the adapter names; they are
    prepared as ``tta-server eval`` prepares them, then hooked (the adapter holds the same
    module objects, so the hooks see every pass it runs).
    """
    counter = PassCounter({})
    prepared, prepared_aux = prepare_for_method(
        adapter, model, auxiliary, lambda m: adapter.prepare(copy.deepcopy(m)), lambda m: m
    )
    handles = [counter.hook(role, aux) for role, aux in prepared_aux.items()]
    handles.append(counter.hook("model", prepared))
    state: StreamState = adapter.init_state(prepared, seed=0)
    initial_bytes = state.nbytes()
    for x in batches[:warmup]:
        state = adapter.step(prepared, x, state).state
    counter.forwards = dict.fromkeys(counter.forwards, 0)
    reported_f = reported_b = 0
    timed = batches[warmup:]
    with counter.counting_backwards():
        started = time.perf_counter()
        for x in timed:
            result = adapter.step(prepared, x, state)
            state = result.state
            reported_f += result.info.forwards
            reported_b += result.info.backwards
        elapsed = time.perf_counter() - started
    for handle in handles:
        handle.remove()
    n = len(timed)
    return CostRow(
        model=name,
        method=adapter.name,
        config=adapter.config.model_dump(mode="json"),
        batch_size=int(timed[0].shape[0]),
        steps=n,
        forwards={role: round(count / n, 3) for role, count in counter.forwards.items()},
        backwards=round(counter.backwards / n, 3),
        reported_forwards=round(reported_f / n, 3),
        reported_backwards=round(reported_b / n, 3),
        state_bytes_initial=initial_bytes,
        state_bytes_final=state.nbytes(),
        images_per_s=round(n * int(timed[0].shape[0]) / elapsed, 1),
    )


def normalized_batches(
    images: np.ndarray, mean: Sequence[float], std: Sequence[float], batch_size: int, count: int
) -> list[torch.Tensor]:
    """``count`` normalized batches of ``batch_size``, cycling through the uint8 ``images``."""
    order = np.arange(batch_size * count) % len(images)
    x = normalize(to_tensor_batch(images[order]), mean, std)
    return list(torch.split(x, batch_size))


def add_ratios(rows: list[CostRow]) -> None:
    """Fill ``ratio_to_source``: images/s relative to ``source`` on the same model and batch size."""
    base = {(r.model, r.batch_size): r.images_per_s for r in rows if r.method == "source"}
    for r in rows:
        ref = base.get((r.model, r.batch_size))
        r.ratio_to_source = round(r.images_per_s / ref, 2) if ref else None


def _passes(row: CostRow) -> str:
    parts = [f"{row.forwards.get('model', 0):g}"]
    parts += [f"+ {v:g} {role}" for role, v in row.forwards.items() if role != "model"]
    return " ".join(parts)


def markdown(rows: list[CostRow], skipped: list[str], header: str) -> str:
    """The cost table (one row per model, method and batch size) plus what was skipped."""
    lines = [
        "# Cost per method",
        "",
        "What one adapted stream costs, per method and catalogue model, measured by "
        "`python -m benchmarks.method_cost` (rerun it to refresh this page):",
        "",
        "- **forwards / backwards per batch**: passes counted while `step` runs (forward hooks on the model "
        "and on every auxiliary model such as CEMA's teacher; calls of `torch.autograd.grad`), averaged over "
        "the timed batches; **reported** is what the method itself says in `StepInfo`, so a method that "
        "miscounts shows up as a difference;",
        "- **state bytes per stream**: the stream's tensors at registration and after the run (what the state "
        "store holds; CEMA's uint8 replay buffer grows until `replay_buffer_size`);",
        "- **images/s**: in-process throughput of `step` (no HTTP), and its ratio to `source` on the same model "
        "and batch size.",
        "",
        header,
        "",
        "| model | method | B | forwards / batch | backwards / batch | reported f / b | state bytes / stream "
        "(start → after run) | images/s | × source |",
        "|---|---|---:|---|---:|---|---:|---:|---:|",
    ]
    for r in rows:
        state = f"{r.state_bytes_initial:,}"
        if r.state_bytes_final != r.state_bytes_initial:
            state += f" → {r.state_bytes_final:,}"
        ratio = "–" if r.ratio_to_source is None else f"{r.ratio_to_source:.2f}"
        lines.append(
            f"| {r.model} | {r.method} | {r.batch_size} | {_passes(r)} | {r.backwards:g} | "
            f"{r.reported_forwards:g} / {r.reported_backwards:g} | {state} | {r.images_per_s:,.0f} | {ratio} |"
        )
    if skipped:
        lines += ["", "Not applicable (refused when a stream is configured): " + "; ".join(skipped) + "."]
    return "\n".join(lines) + "\n"


def method_config(method: str, teacher: str, num_classes: int) -> dict[str, Any]:
    """Every method at its defaults, except CEMA: a teacher from the catalogue and, for few classes,
    the redundancy margin of the accuracy results (0.4), so cost and accuracy describe one config."""
    if method != "cema":
        return {}
    return {"teacher": teacher, **({"d_margin": 0.4} if num_classes <= 100 else {})}


def run(args: argparse.Namespace) -> tuple[list[CostRow], list[str]]:
    catalogue = build_catalogue(args.models_dir)
    models = args.models or catalogue.names()
    methods = args.methods or method_names()
    noisy = corrupt(load_labeled_images(args.data).x, "gaussian_noise", 5, seed=0)  # once for every run
    rows: list[CostRow] = []
    skipped: list[str] = []
    jobs = [(m, meth, b) for m in models for b in args.batch_size for meth in methods]
    loaded_cache: dict[str, LoadedModel] = {}

    def load(name: str) -> LoadedModel:
        if name not in loaded_cache:
            loaded_cache[name] = catalogue.load(name)
        return loaded_cache[name]

    for model_name, method, batch_size in track(jobs, description="method cost"):
        loaded = load(model_name)
        adapter = create_adapter(method, method_config(method, args.teacher, len(loaded.spec.classes)))
        aux = {role: load(name).model for role, name in adapter.auxiliary_models().items()}
        steps = args.steps if batch_size > 1 else args.steps_bs1
        batches = normalized_batches(noisy, loaded.spec.mean, loaded.spec.std, batch_size, args.warmup + steps)
        try:
            row = measure(model_name, loaded.model, adapter, aux, batches, args.warmup)
        except AuxiliaryModelError:
            raise
        except UnsupportedModelError:
            if batch_size == args.batch_size[0]:
                skipped.append(f"{method} on {model_name}")
            continue
        rows.append(row)
    add_ratios(rows)
    return rows, skipped


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", help="catalogue model names (default: all)")
    parser.add_argument("--methods", nargs="*", help="method names (default: all registered)")
    parser.add_argument("--batch-size", type=int, nargs="+", default=[64, 1])
    parser.add_argument("--steps", type=int, default=10, help="timed batches per run at B > 1")
    parser.add_argument("--steps-bs1", type=int, default=64, help="timed batches per run at B = 1")
    parser.add_argument("--warmup", type=int, default=2, help="untimed batches before timing")
    parser.add_argument("--teacher", default="resnet56", help="catalogue model CEMA uses as teacher")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--models-dir", type=Path, default=Path("../shared/models"))
    parser.add_argument("--out", type=Path, default=None, help="JSON output")
    parser.add_argument("--markdown", type=Path, default=None, help="Markdown output")
    parser.add_argument("--note", default="", help="a sentence on the conditions, added to the header")
    args = parser.parse_args(argv)
    if min(args.batch_size) < 1 or args.steps < 1 or args.steps_bs1 < 1 or args.warmup < 0:
        parser.error("batch sizes and step counts must be positive (warm-up may be 0)")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows, skipped = run(args)
    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads"
    header = (
        f"Measured {time.strftime('%Y-%m-%d')} on {machine}, torch {torch.__version__}, CPU; "
        f"Gaussian noise severity 5 on `{args.data.name}`, {args.warmup} warm-up + {args.steps} timed batches "
        f"at B > 1, {args.steps_bs1} at B = 1; CEMA teacher `{args.teacher}`." + (f" {args.note}" if args.note else "")
    )
    table = markdown(rows, skipped, header)
    sys.stdout.write(table)
    if args.markdown is not None:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(table)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        payload = {"header": header, "rows": [asdict(r) for r in rows], "skipped": skipped, "argv": vars(args)}
        args.out.write_text(json.dumps(payload, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
