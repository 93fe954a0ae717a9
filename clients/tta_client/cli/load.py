"""``tta-client load``: bounded concurrent load from N streams; throughput and latency percentiles.

Each stream is one simulated camera: ``--concurrency`` requests in flight at a time (1 by
default, so a stream's batches arrive in order as a real camera's would). The run stops at
``--duration`` seconds or after ``--requests`` requests, whichever comes first: both are
always bounded. Retries are off by default so that 429s are counted, not hidden: a load
test measures what the server does when it is full. Warm-up requests (untimed) do wait out a
429 (``Retry-After``, a few tries); whatever they still fail with is reported, never fatal.

Latency is measured at the client (queueing, batching, adaptation and the network);
``batch_images`` from the answers shows how much the server coalesced.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from rich.console import Console
from rich.table import Table

from tta_client.aio import AsyncTTAClient
from tta_client.cli.common import (
    UsageError,
    add_connection_args,
    add_stream_args,
    percentile,
    positive_float,
    positive_int,
    retry_policy,
)
from tta_client.cli.datasets import DatasetError, UInt8Array, load_dataset
from tta_client.errors import QueueFull, TTAClientError

MAX_WORKERS = 1024
WARMUP_ATTEMPTS = 5
"""Tries per warm-up request while the server answers 429."""
WARMUP_MAX_WAIT_S = 5.0
"""Longest wait between warm-up tries, whatever ``Retry-After`` says."""


def add_parser(sub: Any) -> None:
    parser: argparse.ArgumentParser = sub.add_parser(
        "load",
        help="bounded concurrent load from N streams; throughput and p50/p95/p99 latency",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_stream_args(parser)
    group = parser.add_argument_group("load")
    group.add_argument("--streams", type=positive_int, default=4, help="streams to create (default 4)")
    group.add_argument("--concurrency", type=positive_int, default=1, help="requests in flight per stream (default 1)")
    group.add_argument("--duration", type=positive_float, default=10.0, help="seconds to run at most (default 10)")
    group.add_argument("--requests", type=positive_int, default=10_000, help="requests to send at most (default 10000)")
    group.add_argument("--warmup", type=int, default=1, help="untimed requests per stream first (default 1)")
    group.add_argument("--batch-size", type=positive_int, default=8, help="images per request (default 8)")
    group.add_argument("--image-size", type=positive_int, default=32, help="random images' side (default 32)")
    group.add_argument("--data", type=Path, help="send these images (.npz or ImageFolder) instead of random ones")
    group.add_argument("--no-adapt", action="store_true", help="predict without updating the streams")
    group.add_argument("--json", dest="json_out", help="write the report as JSON to this file ('-' for stdout)")
    add_connection_args(parser, default_retries=0)
    parser.set_defaults(run=run)


@dataclass
class Tally:
    """Outcomes of the timed requests."""

    latencies: list[float] = field(default_factory=list)
    batch_images: list[int] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    warmup_errors: Counter[str] = field(default_factory=Counter)
    images: int = 0
    sent: int = 0


def batches(args: argparse.Namespace) -> list[UInt8Array]:
    """A small pool of request batches, cycled by every stream (so decoding costs nothing during the run)."""
    if args.data is None:
        rng = np.random.default_rng(args.seed)
        shape = (args.batch_size, args.image_size, args.image_size, 3)
        return [rng.integers(0, 256, shape, dtype=np.uint8) for _ in range(8)]
    try:
        data = load_dataset(args.data)
        data = data.select(np.arange(min(len(data), 16 * args.batch_size))).decoded()
    except (DatasetError, OSError) as exc:
        raise UsageError(str(exc)) from None
    if data.pixels is None or len(data.pixels) < args.batch_size:
        raise UsageError(f"{args.data} has fewer than --batch-size {args.batch_size} images")
    pixels = data.pixels
    return [pixels[i : i + args.batch_size] for i in range(0, len(pixels) - args.batch_size + 1, args.batch_size)]


async def warm_up(api: AsyncTTAClient, stream_id: str, batch: UInt8Array, adapt: bool, tally: Tally) -> None:
    """One untimed request. A full queue (429) is what a load test runs into, so it is waited out
    (``Retry-After``, capped) up to :data:`WARMUP_ATTEMPTS` times; a warm-up that still fails is
    counted in ``tally.warmup_errors`` and the run goes on, so the report is always printed."""
    for attempt in range(1, WARMUP_ATTEMPTS + 1):
        try:
            await api.predict(stream_id, batch, adapt=adapt, top_k=1)
            return
        except QueueFull as exc:
            if attempt == WARMUP_ATTEMPTS:
                tally.warmup_errors[exc.code] += 1
                return
            await asyncio.sleep(min(WARMUP_MAX_WAIT_S, exc.retry_after if exc.retry_after is not None else 0.5))
        except TTAClientError as exc:
            tally.warmup_errors[exc.code] += 1
            return


async def drive(
    api: AsyncTTAClient, stream_ids: list[str], pool: list[UInt8Array], args: argparse.Namespace
) -> tuple[Tally, float]:
    """Warm every stream up, then run the workers until the time or request budget is spent.

    Returns the tally and the seconds of the timed part (warm-up excluded: a stream's first
    request builds its state, which is not what a steady-state measurement is about).
    """
    adapt = not args.no_adapt
    tally = Tally()
    await asyncio.gather(*(warm_up(api, s, pool[0], adapt, tally) for s in stream_ids for _ in range(args.warmup)))
    started = time.perf_counter()
    deadline = started + args.duration

    async def worker(stream_id: str, offset: int) -> None:
        turn = offset
        while tally.sent < args.requests and time.perf_counter() < deadline:
            tally.sent += 1
            batch = pool[turn % len(pool)]
            turn += 1
            sent = time.perf_counter()
            try:
                remaining = max(0.1, deadline - sent + args.timeout)
                result = await asyncio.wait_for(api.predict(stream_id, batch, adapt=adapt, top_k=1), remaining)
            except TTAClientError as exc:
                tally.errors[exc.code] += 1
                continue
            except TimeoutError:
                tally.errors["timeout"] += 1
                continue
            tally.latencies.append(time.perf_counter() - sent)
            tally.batch_images.append(result.batch_images)
            tally.images += len(result.predictions)

    workers = [worker(s, i * args.concurrency + j) for i, s in enumerate(stream_ids) for j in range(args.concurrency)]
    await asyncio.gather(*workers)
    return tally, time.perf_counter() - started


async def main(args: argparse.Namespace, console: Console) -> dict[str, Any]:
    pool = batches(args)
    workers = args.streams * args.concurrency
    if workers > MAX_WORKERS:
        raise UsageError(f"--streams x --concurrency = {workers} exceeds {MAX_WORKERS}")
    limits = httpx.Limits(max_connections=workers + 4, max_keepalive_connections=workers + 4)
    api = AsyncTTAClient(
        args.url,
        api_key=args.api_key,
        tenant=args.tenant,
        timeout=args.timeout,
        retry=retry_policy(args),
        limits=limits,
    )
    run_id = uuid.uuid4().hex[:6]
    stream_ids: list[str] = []
    async with api:
        try:
            for i in range(args.streams):
                made = await api.create_stream(
                    args.model, args.method, args.config, stream_id=f"load-{run_id}-{i}", seed=args.seed
                )
                stream_ids.append(made.stream_id)
            console.print(
                f"{args.streams} streams ({args.model}/{args.method}) x {args.concurrency} in flight, batch "
                f"{args.batch_size}, up to {args.duration:g} s or {args.requests} requests against {args.url}"
            )
            tally, elapsed = await drive(api, stream_ids, pool, args)
        finally:
            if not args.keep:
                await asyncio.gather(*(api.delete_stream(s) for s in stream_ids), return_exceptions=True)
    return summarize(tally, elapsed, args)


def summarize(tally: Tally, elapsed: float, args: argparse.Namespace) -> dict[str, Any]:
    ordered = sorted(tally.latencies)
    ok = len(ordered)

    def ms(q: float) -> float | None:
        return round(1000 * percentile(ordered, q), 2) if ordered else None

    return {
        "url": args.url,
        "model": args.model,
        "method": args.method,
        "streams": args.streams,
        "concurrency_per_stream": args.concurrency,
        "batch_size": args.batch_size,
        "adapt": not args.no_adapt,
        "seconds": round(elapsed, 3),
        "requests": tally.sent,
        "ok": ok,
        "errors": dict(tally.errors),
        "warmup_errors": dict(tally.warmup_errors),
        "images": tally.images,
        "requests_per_s": round(ok / elapsed, 2) if elapsed > 0 else None,
        "images_per_s": round(tally.images / elapsed, 2) if elapsed > 0 else None,
        "latency_ms": {
            "p50": ms(50),
            "p95": ms(95),
            "p99": ms(99),
            "max": ms(100),
            "mean": round(1000 * sum(ordered) / ok, 2) if ok else None,
        },
        "mean_batch_images": round(sum(tally.batch_images) / ok, 2) if ok else None,
    }


def print_table(report: dict[str, Any], console: Console) -> None:
    table = Table(title=f"load: {report['model']}/{report['method']}, {report['streams']} streams")
    table.add_column("metric")
    table.add_column("value", justify="right")
    latency = report["latency_ms"]
    rows = [
        ("requests (ok / sent)", f"{report['ok']} / {report['requests']}"),
        ("errors", ", ".join(f"{k}: {v}" for k, v in report["errors"].items()) or "none"),
        ("warm-up errors", ", ".join(f"{k}: {v}" for k, v in report["warmup_errors"].items()) or "none"),
        ("duration", f"{report['seconds']:.2f} s"),
        ("throughput", f"{report['requests_per_s']} req/s, {report['images_per_s']} images/s"),
        *(
            (f"latency {k}", f"{latency[k]} ms" if latency[k] is not None else "-")
            for k in ("p50", "p95", "p99", "max")
        ),
        ("mean images per server batch", str(report["mean_batch_images"])),
    ]
    for name, value in rows:
        table.add_row(name, value)
    console.print(table)


def run(args: argparse.Namespace, console: Console) -> int:
    """Run the load, print the table (and JSON); 1 when no request succeeded."""
    if args.json_out == "-":
        console = Console(stderr=True, highlight=False, soft_wrap=True)
    report = asyncio.run(main(args, console))
    print_table(report, console)
    if args.json_out:
        text = json.dumps(report, indent=2) + "\n"
        if args.json_out == "-":
            sys.stdout.write(text)
        else:
            Path(args.json_out).write_text(text)
            console.print(f"report written to {args.json_out}")
    return 0 if report["ok"] else 1
