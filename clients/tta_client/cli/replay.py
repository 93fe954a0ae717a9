"""``tta-client replay``: stream a labelled dataset through a stream and watch accuracy adapt.

The images go to the server in batches, in one fixed (seeded) order, exactly as a camera
would send them; the labels never leave the client. Accuracy is therefore *online*: each
image is scored by the prediction the stream gave when it arrived, before any later image
could help. An optional baseline stream (``--baseline source``) receives the same batches,
so the plot shows what adaptation bought over the frozen model on the same images.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from tta_client.cli.common import (
    UsageError,
    add_connection_args,
    add_stream_args,
    percentile,
    positive_float,
    positive_int,
    retry_policy,
)
from tta_client.cli.corruption import load_corruptions
from tta_client.cli.datasets import Dataset, DatasetError, label_map, load_dataset
from tta_client.cli.plot import Curve, plot_replay
from tta_client.client import TTAClient
from tta_client.errors import Conflict, TTAClientError


def add_parser(sub: Any) -> None:
    parser: argparse.ArgumentParser = sub.add_parser(
        "replay",
        help="replay a labelled dataset through a stream; online accuracy, plot",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("data", type=Path, help="ImageFolder directory or .npz (x: uint8 N x H x W x 3, y: labels)")
    add_stream_args(parser)
    parser.add_argument("--stream-id", help="id of the stream to create (default: replay-<random>)")
    parser.add_argument("--baseline", metavar="METHOD", help="also replay through a second stream, e.g. 'source'")
    group = parser.add_argument_group("replay")
    group.add_argument("--batch-size", type=positive_int, default=64, help="images per request (default 64)")
    group.add_argument("--limit", type=positive_int, help="replay at most this many images")
    group.add_argument("--no-shuffle", action="store_true", help="keep the dataset order (default: seeded shuffle)")
    group.add_argument("--order-seed", type=int, default=0, help="seed of the replay order (default 0)")
    group.add_argument("--corruption", help="corrupt images first (needs the tta-server package), e.g. gaussian_noise")
    group.add_argument("--severity", type=int, default=5, help="corruption severity 1-5 (default 5)")
    group.add_argument("--no-adapt", action="store_true", help="predict without updating the stream")
    group.add_argument("--window", type=positive_int, default=200, help="images in the sliding accuracy (default 200)")
    group.add_argument("--max-seconds", type=positive_float, help="stop after this long even if images remain")
    group.add_argument("--plot", type=Path, help="write the accuracy plot here (PNG; needs matplotlib)")
    group.add_argument("--json", type=Path, dest="json_out", help="write the results here as JSON")
    add_connection_args(parser, default_retries=3)
    parser.set_defaults(run=run)


@dataclass
class Run:
    """What one stream scored during the replay."""

    stream_id: str
    method: str
    correct: list[bool] = field(default_factory=list)
    batch_ends: list[int] = field(default_factory=list)
    batch_entropy: list[float] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    batch_regime: list[str | None] = field(default_factory=list)

    def record(
        self,
        predicted: list[int],
        labels: np.ndarray,
        entropies: list[float],
        seconds: float,
        regime: str | None = None,
    ) -> None:
        self.correct += [int(p) == int(t) for p, t in zip(predicted, labels, strict=True)]
        self.batch_ends.append(len(self.correct))
        self.batch_entropy.append(float(np.mean(entropies)))
        self.latencies.append(seconds)
        self.batch_regime.append(regime)

    @property
    def accuracy(self) -> float:
        return float(np.mean(self.correct)) if self.correct else float("nan")

    def window_accuracy(self, window: int) -> float:
        recent = self.correct[-window:]
        return float(np.mean(recent)) if recent else float("nan")

    def summary(self, window: int) -> dict[str, Any]:
        ordered = sorted(self.latencies)
        return {
            "stream_id": self.stream_id,
            "method": self.method,
            "images": len(self.correct),
            "accuracy": self.accuracy,
            f"accuracy_last_{window}": self.window_accuracy(window),
            "entropy_first_batch": self.batch_entropy[0] if self.batch_entropy else None,
            "entropy_last_batch": self.batch_entropy[-1] if self.batch_entropy else None,
            "latency_ms": {"p50": 1000 * percentile(ordered, 50), "p95": 1000 * percentile(ordered, 95)},
        }


def prepare(args: argparse.Namespace, console: Console) -> tuple[Dataset, str]:
    """The images in replay order (shuffled, limited, corrupted), and a label for the domain."""
    try:
        data = load_dataset(args.data)
    except DatasetError as exc:
        raise UsageError(str(exc)) from None
    order = np.arange(len(data)) if args.no_shuffle else np.random.default_rng(args.order_seed).permutation(len(data))
    data = data.select(order[: args.limit] if args.limit else order)
    if not args.corruption:
        return data, "clean"
    corruptions = load_corruptions()
    if isinstance(corruptions, str):
        console.print(f"[yellow]warning:[/yellow] --corruption {args.corruption} skipped: {corruptions}")
        return data, "clean (corruption unavailable)"
    try:
        corruptions.check(args.corruption, args.severity)
        data = data.decoded()
    except (ValueError, OSError) as exc:
        raise UsageError(str(exc)) from None
    if data.pixels is None:
        raise UsageError(f"{args.data}: cannot decode images for corruption")
    started = time.perf_counter()
    data.pixels = corruptions.corrupt(data.pixels, args.corruption, args.severity, args.order_seed)
    console.print(
        f"corrupted {len(data)} images with {args.corruption} (severity {args.severity}) "
        f"in {time.perf_counter() - started:.1f} s"
    )
    return data, f"{args.corruption}-{args.severity}"


def create(api: TTAClient, args: argparse.Namespace, method: str, stream_id: str) -> str:
    config = args.config if method == args.method else {}
    try:
        made = api.create_stream(args.model, method, config, stream_id=stream_id, seed=args.seed)
    except Conflict:
        raise UsageError(f"stream '{stream_id}' already exists; delete it or choose another --stream-id") from None
    return made.stream_id


def run(args: argparse.Namespace, console: Console) -> int:
    """Replay, print the summary, write plot and JSON; returns the exit status."""
    data, domain = prepare(args, console)
    api = TTAClient(args.url, api_key=args.api_key, tenant=args.tenant, timeout=args.timeout, retry=retry_policy(args))
    with api:
        model = next((m for m in api.models() if m.name == args.model), None)
        if model is None:
            raise UsageError(f"the server has no model '{args.model}' (see GET /v1/models)")
        try:
            labels = label_map(data, model.classes)
        except DatasetError as exc:
            raise UsageError(str(exc)) from None
        base_id = args.stream_id or f"replay-{uuid.uuid4().hex[:8]}"
        runs = [Run(create(api, args, args.method, base_id), args.method)]
        if args.baseline:
            runs.append(Run(create(api, args, args.baseline, f"{base_id}-{args.baseline}"), args.baseline))
        try:
            elapsed = replay(api, runs, data, labels, args, console)
        finally:
            if not args.keep:
                for r in runs:
                    try:
                        api.delete_stream(r.stream_id)
                    except TTAClientError as exc:
                        console.print(f"[yellow]could not delete stream {r.stream_id}: {exc}[/yellow]")
    return report(runs, args, data, domain, elapsed, console)


def replay(
    api: TTAClient, runs: list[Run], data: Dataset, labels: np.ndarray, args: argparse.Namespace, console: Console
) -> float:
    """Send every batch to every run's stream, scoring as it goes; returns the seconds spent."""
    started = time.perf_counter()
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[score]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(f"replay {data.name}", total=len(data), score="")
        for start in range(0, len(data), args.batch_size):
            if args.max_seconds is not None and time.perf_counter() - started > args.max_seconds:
                console.print(f"[yellow]stopped after --max-seconds {args.max_seconds:g}[/yellow]")
                break
            stop = min(start + args.batch_size, len(data))
            batch = data.batch(start, stop)
            for r in runs:
                sent = time.perf_counter()
                result = api.predict(r.stream_id, batch, adapt=not args.no_adapt, top_k=1)
                entropies = [p.entropy for p in result.predictions]
                r.record(result.labels, labels[start:stop], entropies, time.perf_counter() - sent, result.regime)
            score = "  ".join(
                f"{r.method} {100 * r.accuracy:.1f}% (last {args.window}: {100 * r.window_accuracy(args.window):.1f}%)"
                for r in runs
            )
            progress.update(task, completed=stop, score=score)
    return time.perf_counter() - started


def report(
    runs: list[Run], args: argparse.Namespace, data: Dataset, domain: str, elapsed: float, console: Console
) -> int:
    images = len(runs[0].correct)
    table = Table(title=f"{args.model} on {data.name} ({domain}), {images} images, batch {args.batch_size}")
    for column in ("method", "accuracy", f"last {args.window}", "entropy first -> last", "p50 ms", "p95 ms"):
        table.add_column(column, justify="left" if column == "method" else "right")
    summaries = [r.summary(args.window) for r in runs]
    for s in summaries:
        table.add_row(
            s["method"],
            f"{100 * s['accuracy']:.2f}%",
            f"{100 * s[f'accuracy_last_{args.window}']:.2f}%",
            f"{s['entropy_first_batch']:.3f} -> {s['entropy_last_batch']:.3f}"
            if s["entropy_first_batch"] is not None
            else "-",
            f"{s['latency_ms']['p50']:.1f}",
            f"{s['latency_ms']['p95']:.1f}",
        )
    console.print(table)
    console.print(f"{images} images in {elapsed:.1f} s ({images * len(runs) / max(elapsed, 1e-9):.1f} images/s sent)")
    title = f"{args.model} on {data.name}, {domain}: online top-1 ({images} images, batch {args.batch_size})"
    if args.plot and images:
        if importlib.util.find_spec("matplotlib") is None:
            console.print("[yellow]no plot: matplotlib is missing (pip install 'tta-client[plot]')[/yellow]")
        else:
            curves = [
                Curve(r.method, np.asarray(r.correct, dtype=bool), r.batch_ends, r.batch_entropy, r.batch_regime)
                for r in runs
            ]
            plot_replay(curves, args.window, title, args.plot)
            console.print(f"plot written to {args.plot}")
    if args.json_out:
        payload = {
            "data": str(args.data),
            "domain": domain,
            "model": args.model,
            "config": args.config,
            "batch_size": args.batch_size,
            "adapt": not args.no_adapt,
            "seconds": elapsed,
            "runs": summaries,
        }
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(payload, indent=2) + "\n")
        console.print(f"results written to {args.json_out}")
    return 0 if images else 1
