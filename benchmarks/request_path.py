"""Server CPU per single-image ``.npy`` predict: tta-server (this tree, an older one) against the plain server.

    git archive <old commit> | tar -x -C /tmp/tta-before
    .venv/bin/python -m benchmarks.request_path --before /tmp/tta-before --rounds 3

Every server is a subprocess with one torch thread and the in-memory store (tta-server with the
drift monitor off), under uvicorn with an explicit HTTP stack: ``h11`` + ``asyncio`` (what
uvicorn uses when httptools and uvloop are absent) and ``httptools`` + ``uvloop`` (what it picks
when they are installed, as this project's dependencies now make it). For each server, one
client sends single-image requests one after the other, each after the previous answer: the
server process's user + system CPU per request (from /proc, every thread) and the p50 latency;
then 16 streams x 1 image concurrently for 1.5 s: requests/s at saturation. The model forward
(`source`, ResNet-20, batch 1) is in every figure alike, so differences are request-path CPU.
Rounds are interleaved (every server once per round); medians with the min-max spread.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.fused_streams import Server, create_streams, load, npy_body, sequential, wait_ready
from tests.support.processes import free_port

TTA = (
    "import sys, uvicorn; from tta_server.app import create_app; from tta_server.settings import Settings; "
    "uvicorn.run(create_app(Settings(drift_sample_every=0, torch_threads=1, log_level='warning')), "
    "port=int(sys.argv[1]), log_level='warning', http=sys.argv[2], loop=sys.argv[3])"
)
PLAIN = (
    "import sys, torch, uvicorn; from pathlib import Path; from benchmarks.plain_server import create_plain_app; "
    "torch.set_num_threads(1); uvicorn.run(create_plain_app('resnet20', Path(sys.argv[4])), "
    "port=int(sys.argv[1]), log_level='warning', http=sys.argv[2], loop=sys.argv[3])"
)
STACKS = {"h11": ("h11", "asyncio"), "httptools": ("httptools", "uvloop")}


def start(name: str, plain: bool, stack: str, cwd: Path, models_dir: Path) -> Server:
    http, loop = STACKS[stack]
    port = free_port()
    cmd = [sys.executable, "-c", PLAIN if plain else TTA, str(port), http, loop, str(models_dir)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TTA_MODELS_DIR": str(models_dir)}
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return Server(name, plain, proc, f"http://127.0.0.1:{port}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", type=Path, default=None, help="an older tree of this project to compare")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=150, help="sequential requests per server per round")
    parser.add_argument("--models-dir", type=Path, default=Path("../shared/models").resolve())
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/request_path.json"))
    args = parser.parse_args(argv)
    here = Path.cwd()
    wanted = [("tta-server", False, "h11", here), ("tta-server", False, "httptools", here)]
    wanted += [("plain", True, "h11", here), ("plain", True, "httptools", here)]
    if args.before is not None:
        wanted.insert(0, ("tta-server before", False, "h11", args.before.resolve()))
    servers = [start(f"{n} ({stack})", plain, stack, cwd, args.models_dir) for n, plain, stack, cwd in wanted]
    body = npy_body(np.random.default_rng(0).integers(0, 256, (1, 32, 32, 3), dtype=np.uint8))
    runs: dict[str, list[tuple[float, float, float]]] = {s.name: [] for s in servers}
    try:
        for server in servers:
            wait_ready(server)
        pools = {s.name: create_streams(s, "resnet20", "source", "rp", 16) for s in servers}
        for _ in range(args.rounds):
            for s in servers:
                latencies, cpu = asyncio.run(sequential(s, pools[s.name][0], body, args.requests))
                cell = asyncio.run(load(s, pools[s.name], body, 1, 1.5, 100_000))
                runs[s.name].append((statistics.median(latencies), cpu, cell.images_per_s))
    finally:
        for server in servers:
            server.stop()

    def spread(values: list[float]) -> dict[str, float]:
        return {"median": statistics.median(values), "min": min(values), "max": max(values)}

    rows = {
        name: {
            "p50_s": spread([r[0] for r in v]),
            "cpu_s_per_request": spread([r[1] for r in v]),
            "requests_per_s_16x1": spread([r[2] for r in v]),
        }
        for name, v in runs.items()
    }
    report: dict[str, object] = {"date": time.strftime("%Y-%m-%d")}
    report["machine"] = f"{os.uname().machine}, {os.cpu_count()} cores"
    report |= {"rounds": args.rounds, "requests": args.requests, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")

    def fmt(s: dict[str, float], scale: float, digits: int) -> str:
        return f"{scale * s['median']:.{digits}f} ({scale * s['min']:.{digits}f}-{scale * s['max']:.{digits}f})"

    lines = [
        f"# Request path: server CPU per single-image predict ({report['machine']}, {report['date']})",
        "",
        "`python -m benchmarks.request_path`: ResNet-20 `source`, one torch thread, drift off; median (min-max) "
        f"over {args.rounds} interleaved rounds; the same batch-1 forward is inside every figure.",
        "",
        "| server (HTTP stack) | server CPU per request (ms) | sequential p50 (ms) | 16 streams x 1 image (req/s) |",
        "|---|---:|---:|---:|",
    ]
    lines += [
        f"| {name} | {fmt(r['cpu_s_per_request'], 1000, 2)} | {fmt(r['p50_s'], 1000, 2)} "
        f"| {fmt(r['requests_per_s_16x1'], 1, 0)} |"
        for name, r in rows.items()
    ]
    text = "\n".join(lines) + "\n"
    args.out.with_suffix(".md").write_text(text)
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
