"""Request-path CPU without the HTTP server: tta-server's app against the plain app, called as ASGI apps.

    .venv/bin/python -m benchmarks.request_path_asgi --rounds 10 --requests 200

Why a second request-path benchmark: over loopback HTTP (:mod:`benchmarks.request_path`) the
server's CPU per request is read from /proc in clock ticks while a client, a kernel and a noisy
neighbour share two cores, and rounds of the same code spread by 0.5 ms. Here both apps run in
this one process and are called directly (the ASGI scope, one ``http.request`` message, the
``send`` messages collected), one single-image ``.npy`` predict after the other, so the figure
is the process CPU time (``time.process_time``, every thread) per request of the app itself:
parsing, admission, decoding, queueing, the same ResNet-20 ``source`` forward at batch 1, the
answer. Rounds alternate the two apps (A/B/A/B); the result is the median per-round difference
with its min-max spread, plus each app's median. No uvicorn, no socket: what this measures is
what tta-server adds around the model, and only that.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch

from benchmarks.fused_streams import npy_body, spread
from benchmarks.plain_server import create_plain_app
from tta_server.app import create_app
from tta_server.settings import Settings

Message = MutableMapping[str, Any]
ASGIApp = Callable[[Message, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]], Awaitable[None]]


def scope(path: str, body: bytes) -> Message:
    """An HTTP/1.1 POST scope for ``path`` with a ``.npy`` body of ``len(body)`` bytes."""
    headers = [(b"host", b"bench"), (b"content-type", b"application/x-npy"), (b"content-length", b"%d" % len(body))]
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }


async def call(app: ASGIApp, path: str, body: bytes) -> None:
    """One request through ``app``; raises unless it answered 200."""
    delivered = False

    async def receive() -> Message:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()  # the client never disconnects
        raise AssertionError("unreachable")

    status: list[int] = []

    async def send(message: Message) -> None:
        if message["type"] == "http.response.start":
            status.append(message["status"])

    await app(scope(path, body), receive, send)
    if status != [200]:
        raise RuntimeError(f"{path}: answered {status}")


async def cpu_per_request(app: ASGIApp, path: str, body: bytes, requests: int) -> float:
    """Process CPU milliseconds per request over ``requests`` sequential calls."""
    began = time.process_time()
    for _ in range(requests):
        await call(app, path, body)
    return (time.process_time() - began) / requests * 1000


async def measure(models_dir: Path, rounds: int, requests: int) -> dict[str, Any]:
    torch.set_num_threads(1)
    pixels = np.random.default_rng(0).integers(0, 256, (1, 32, 32, 3), dtype=np.uint8)
    body = npy_body(pixels)
    settings = Settings(drift_sample_every=0, torch_threads=1, log_level="warning", models_dir=models_dir)
    tta, plain = create_app(settings), create_plain_app("resnet20", models_dir)
    async with tta.router.lifespan_context(tta):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=tta), base_url="http://bench") as client:
            created = await client.post("/v1/streams", json={"model": "resnet20", "method": "source", "stream_id": "s"})
            created.raise_for_status()
        apps: dict[str, tuple[ASGIApp, str]] = {"tta": (tta, "/v1/streams/s/predict"), "plain": (plain, "/predict")}
        for app, path in apps.values():  # warm-up
            for _ in range(30):
                await call(app, path, body)
        figures: dict[str, list[float]] = {name: [] for name in apps}
        for round_ in range(rounds):
            for name, (app, path) in apps.items():
                figures[name].append(await cpu_per_request(app, path, body, requests))
            done = ", ".join(f"{k} {v[-1]:.3f} ms" for k, v in figures.items())
            print(f"round {round_ + 1}/{rounds}: {done}", file=sys.stderr)  # noqa: T201
    diffs = [a - b for a, b in zip(figures["tta"], figures["plain"], strict=True)]
    return {
        "rounds": rounds,
        "requests_per_round": requests,
        "cpu_ms_per_request": {k: spread(v) for k, v in figures.items()},
        "difference_ms": spread(diffs),
        "date": time.strftime("%Y-%m-%d"),
    }


def render(report: dict[str, Any]) -> str:
    cpu, diff = report["cpu_ms_per_request"], report["difference_ms"]
    return "\n".join(
        [
            f"# Request path without the HTTP server ({report['date']})",
            "",
            f"`python -m benchmarks.request_path_asgi`: {report['rounds']} interleaved rounds of "
            f"{report['requests_per_round']} sequential single-image `.npy` predicts per app, ResNet-20 `source`, "
            "one torch thread, drift off; process CPU per request, median (min-max) over rounds.",
            "",
            "| app | CPU per request (ms) |",
            "|---|---:|",
            *(f"| {name} | {c['median']:.3f} ({c['min']:.3f}-{c['max']:.3f}) |" for name, c in cpu.items()),
            f"| tta-server minus plain, per round | {diff['median']:+.3f} ({diff['min']:+.3f} to {diff['max']:+.3f}) |",
            "",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--requests", type=int, default=200, help="sequential requests per app per round")
    parser.add_argument("--models-dir", type=Path, default=Path("../shared/models"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/request_path_asgi.json"))
    args = parser.parse_args(argv)
    write_report(args.out, asyncio.run(measure(args.models_dir, args.rounds, args.requests)), render)
    return 0


def write_report(out: Path, report: dict[str, Any], render: Callable[[dict[str, Any]], str]) -> None:
    """The report as JSON at ``out``, its Markdown next to it and on standard output."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    markdown = render(report)
    out.with_suffix(".md").write_text(markdown)
    sys.stdout.write(markdown)


if __name__ == "__main__":
    raise SystemExit(main())
