"""Request-path work in CPU instructions: tta-server's app against the plain app, counted, not timed.

    .venv/bin/python -m benchmarks.request_path_instructions                 # about 5 minutes
    .venv/bin/python -m benchmarks.request_path_instructions --before /tmp/tta-before

Why a third request-path benchmark: the difference to measure (a tenth of a millisecond per
request) is smaller than what a shared 2-core VM's timing moves between rounds of the same code
(0.3-1 ms in :mod:`benchmarks.request_path_asgi`). Instructions executed do not move: each app
runs in its own process under valgrind's callgrind tool with counting off; after a warm-up the
process switches counting on (``callgrind_control``) for ``--requests`` sequential single-image
``.npy`` predicts, called as an ASGI app exactly as :mod:`benchmarks.request_path_asgi` calls
it (no uvicorn, no socket), and off again. The figure is instructions per request; two runs of
one tree agree within a few hundred instructions per request (a fixed hash seed).
Instructions are not time (interpreted Python runs fewer instructions per cycle than a
convolution), but the same ResNet-20 ``source`` batch-1 forward is in every figure, so the
difference between two apps is the work one path does beyond the other's.

``--before`` also counts tta-server from an older tree of this project (its own
``tta_server`` package, this tree's harness). Needs valgrind (``apt-get install valgrind``);
writes ``benchmarks/results/request_path_instructions.{json,md}``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import uvloop

WARM_UP = 20


def callgrind_totals(out_file: Path) -> int:
    """The instruction total of a callgrind output file (its ``totals:`` line)."""
    for line in out_file.read_text(errors="replace").splitlines():
        if line.startswith("totals:"):
            return int(line.split()[1])
    raise ValueError(f"{out_file}: no 'totals:' line (did the run count anything?)")


def _count(on: bool) -> None:
    """Switch callgrind's counting for this process on or off."""
    command = ["callgrind_control", "-i", "on" if on else "off", str(os.getpid())]
    subprocess.run(command, check=True, capture_output=True)


async def _child(app_name: str, root: Path, models_dir: Path, requests: int) -> None:
    """Run inside valgrind: warm up, then count ``requests`` predicts of one app."""
    sys.path.insert(0, str(root))  # the tree whose tta_server is counted (this one, or --before)
    import httpx
    import numpy as np
    import torch

    from benchmarks.fused_streams import npy_body
    from benchmarks.plain_server import create_plain_app
    from benchmarks.request_path_asgi import call
    from tta_server.app import create_app
    from tta_server.settings import Settings

    torch.set_num_threads(1)
    body = npy_body(np.random.default_rng(0).integers(0, 256, (1, 32, 32, 3), dtype=np.uint8))

    async def counted(app: Any, path: str) -> None:
        for _ in range(WARM_UP):
            await call(app, path, body)
        _count(True)
        for _ in range(requests):
            await call(app, path, body)
        _count(False)

    if app_name == "plain":
        await counted(create_plain_app("resnet20", models_dir), "/predict")
        return
    # callgrind runs everything ~50x slower; without lifting the time bound on inline batches
    # (``inline_max_ms``, a moving average of batch time) the counted requests would take the worker
    # thread's path, which a real server takes only for slow batches, not this one
    settings = Settings(
        drift_sample_every=0, torch_threads=1, log_level="warning", models_dir=models_dir, inline_max_ms=1000
    )
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://bench") as client:
            created = await client.post("/v1/streams", json={"model": "resnet20", "method": "source", "stream_id": "s"})
            created.raise_for_status()
        await counted(app, "/v1/streams/s/predict")


def _launch(app_name: str, root: Path, args: argparse.Namespace, out: Path) -> subprocess.Popen[bytes]:
    """One app's counting process under valgrind, writing callgrind's output to ``out``."""
    command = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}"]
    command += [sys.executable, "-m", "benchmarks.request_path_instructions", "--child", app_name]
    command += ["--root", str(root), "--models-dir", str(args.models_dir), "--requests", str(args.requests)]
    here = Path(__file__).resolve().parents[1]
    # one hash seed for every run: with random ones, dict and set layouts (and so the counts) moved by
    # ~0.3% between runs of one tree; with a fixed seed two runs of 100 requests agreed within 100 instructions
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    return subprocess.Popen(command, cwd=here, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Every app counted in its own valgrind process, ``--parallel`` at a time; instructions per request."""
    here = Path(__file__).resolve().parents[1]
    wanted = {"tta-server": ("tta", here), "plain": ("plain", here)}
    if args.before is not None:
        wanted["tta-server before"] = ("tta", args.before.resolve())
    per_request: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        names = list(wanted)
        for start in range(0, len(names), args.parallel):
            batch = names[start : start + args.parallel]
            outs = {n: Path(tmp) / f"{n.replace(' ', '_')}.callgrind" for n in batch}
            procs = {n: _launch(*wanted[n], args, outs[n]) for n in batch}
            for name, proc in procs.items():
                _, stderr = proc.communicate()
                if proc.returncode != 0:
                    raise RuntimeError(f"{name}: exit {proc.returncode}: {stderr.decode(errors='replace')[-2000:]}")
                total = callgrind_totals(outs[name])
                per_request[name] = total / args.requests
                print(f"{name}: {per_request[name] / 1e6:.3f} M instructions per request", file=sys.stderr)  # noqa: T201
    plain = per_request["plain"]
    return {
        "date": time.strftime("%Y-%m-%d"),
        "requests": args.requests,
        "instructions_per_request": per_request,
        "minus_plain": {k: v - plain for k, v in per_request.items() if k != "plain"},
    }


def render(report: dict[str, Any]) -> str:
    per, diff = report["instructions_per_request"], report["minus_plain"]
    rows = []
    for name, count in per.items():
        if name == "plain":
            rows.append(f"| {name} | {count / 1e6:.3f} | - | - |")
        else:
            share = 100 * diff[name] / per["plain"]
            rows.append(f"| {name} | {count / 1e6:.3f} | {diff[name] / 1e6:+.3f} | {share:+.1f}% |")
    return "\n".join(
        [
            f"# Request path in instructions ({report['date']})",
            "",
            f"`python -m benchmarks.request_path_instructions`: {report['requests']} sequential single-image `.npy` "
            "predicts per app, called in process as ASGI apps, ResNet-20 `source`, one torch thread, drift off; "
            "instructions counted by callgrind with a fixed hash seed and the inline batch's time bound lifted "
            "(callgrind runs ~50x slower; a real server runs this batch inline), repeated runs of one tree "
            "agreed within a few hundred instructions per request; timings of the same code moved by 10-30% "
            "between rounds.",
            "",
            "| app | M instructions per request | minus plain (M) | minus plain |",
            "|---|---:|---:|---:|",
            *rows,
            "",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=100, help="counted sequential requests per app")
    parser.add_argument("--models-dir", type=Path, default=Path("../shared/models").resolve())
    parser.add_argument("--before", type=Path, default=None, help="an older tree of this project to count too")
    parser.add_argument("--parallel", type=int, default=2, help="valgrind processes at a time")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/request_path_instructions.json"))
    parser.add_argument("--child", choices=["tta", "plain"], help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        # the loop a server runs on: uvicorn picks uvloop when installed (a dependency of this project)
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(_child(args.child, args.root or Path.cwd(), args.models_dir, args.requests))
        return 0
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        parser.error("valgrind is not installed (apt-get install valgrind)")
    from benchmarks.request_path_asgi import write_report

    write_report(args.out, measure(args), render)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
