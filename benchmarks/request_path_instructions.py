"""Request-path work in CPU instructions: tta-server's app against the plain app, counted, not timed.

    .venv/bin/python -m benchmarks.request_path_instructions                 # about 12 minutes
    .venv/bin/python -m benchmarks.request_path_instructions --before /tmp/tta-before --repeats 2

Why a third request-path benchmark: the difference to measure (a tenth of a millisecond per
request) is smaller than what a shared 2-core VM's timing moves between rounds of the same code
(0.3-1 ms in :mod:`benchmarks.request_path_asgi`). Instructions executed barely move: each app
runs in its own process under valgrind's callgrind tool with counting off; after a warm-up the
process switches counting on (``callgrind_control``) for ``--requests`` sequential single-image
``.npy`` predicts, called as an ASGI app exactly as :mod:`benchmarks.request_path_asgi` calls
it (no uvicorn, no socket), and off again. The figure is instructions per request. With a fixed
hash seed, what still differs between two processes of one tree is the order of objects hashed
by address (some thousands of instructions per request), so every app is counted ``--repeats``
times in interleaved rounds and the report gives the median and the spread.
Instructions are not time (interpreted Python runs fewer instructions per cycle than a
convolution), but the same ResNet-20 ``source`` batch-1 forward is in every figure, so the
difference between two apps is the work one path does beyond the other's.

A real server runs this lone small batch inline, on the event loop. Under valgrind a forward
takes over a second, beyond the largest inline time bound the settings accept, so the child
lifts the bound on the batcher and fails if any counted batch was handed to the worker thread
(a count of that path, thread hand-off included, is not what a server does for this request).

``--before`` also counts tta-server from an older tree of this project (its own
``tta_server`` package, this tree's harness). Needs valgrind (``apt-get install valgrind``);
writes ``benchmarks/results/request_path_instructions.{json,md}``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import uvloop

WARM_UP = 20
T = TypeVar("T")


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

    async def counted(app: Any, path: str, handed_to_worker: Callable[[], int] = lambda: 0) -> None:
        for _ in range(WARM_UP):
            await call(app, path, body)
        before = handed_to_worker()
        _count(True)
        for _ in range(requests):
            await call(app, path, body)
        _count(False)
        if handed_to_worker() != before:
            raise RuntimeError(f"{handed_to_worker() - before} counted batches ran on the worker thread, not inline")

    if app_name == "plain":
        await counted(create_plain_app("resnet20", models_dir), "/predict")
        return
    settings = Settings(drift_sample_every=0, torch_threads=1, log_level="warning", models_dir=models_dir)
    app = create_app(settings)
    # under valgrind a batch-1 forward takes over a second; with the time bound on inline batches
    # (``inline_max_ms``, a moving average of batch time, at most 1,000 ms as a setting) the counted
    # requests took the worker thread's path, which a real server takes only for slow batches, not this
    # one; the bound is lifted on the batcher itself, and the child checks that every request ran inline
    batcher = app.state.services.streams.batcher
    batcher.inline_max_seconds = float("inf")
    batcher._executor = worker = CountingExecutor(max_workers=1, thread_name_prefix="tta-runner")
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://bench") as client:
            created = await client.post("/v1/streams", json={"model": "resnet20", "method": "source", "stream_id": "s"})
            created.raise_for_status()
        await counted(app, "/v1/streams/s/predict", lambda: worker.submitted)


class CountingExecutor(ThreadPoolExecutor):
    """The batcher's worker thread, counting what is handed to it (nothing, for a batch that runs inline)."""

    submitted = 0

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        self.submitted += 1
        return super().submit(fn, *args, **kwargs)


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
    """Every app counted ``--repeats`` times, each in its own valgrind process, rounds interleaved (every app once
    per round), ``--parallel`` processes at a time; instructions per request, every run and the median."""
    here = Path(__file__).resolve().parents[1]
    wanted = {"tta-server": ("tta", here), "plain": ("plain", here)}
    if args.before is not None:
        wanted["tta-server before"] = ("tta", args.before.resolve())
    runs: dict[str, list[float]] = {name: [] for name in wanted}
    order = [(name, round_) for round_ in range(args.repeats) for name in wanted]
    with tempfile.TemporaryDirectory() as tmp:
        for start in range(0, len(order), args.parallel):
            batch = order[start : start + args.parallel]
            outs = {run: Path(tmp) / f"{run[0].replace(' ', '_')}-{run[1]}.callgrind" for run in batch}
            procs = {run: _launch(*wanted[run[0]], args, outs[run]) for run in batch}
            for (name, round_), proc in procs.items():
                _, stderr = proc.communicate()
                if proc.returncode != 0:
                    raise RuntimeError(f"{name}: exit {proc.returncode}: {stderr.decode(errors='replace')[-2000:]}")
                runs[name].append(callgrind_totals(outs[name, round_]) / args.requests)
                done = f"round {round_ + 1}/{args.repeats}"
                print(f"{name} ({done}): {runs[name][-1] / 1e6:.3f} M instructions per request", file=sys.stderr)  # noqa: T201
    return report_of(runs, args.requests)


def report_of(runs: dict[str, list[float]], requests: int) -> dict[str, Any]:
    """Medians per app and their differences to the plain server's median, with every run kept."""
    median = {name: statistics.median(counts) for name, counts in runs.items()}
    return {
        "date": time.strftime("%Y-%m-%d"),
        "requests": requests,
        "repeats": len(runs["plain"]),
        "instructions_per_request": median,
        "runs": runs,
        "minus_plain": {k: v - median["plain"] for k, v in median.items() if k != "plain"},
    }


def render(report: dict[str, Any]) -> str:
    per, diff, runs = report["instructions_per_request"], report["minus_plain"], report["runs"]
    rows = []
    for name, count in per.items():
        spread = f"{min(runs[name]) / 1e6:.3f}-{max(runs[name]) / 1e6:.3f}"
        if name == "plain":
            rows.append(f"| {name} | {count / 1e6:.3f} | {spread} | - | - |")
        else:
            share = 100 * diff[name] / per["plain"]
            rows.append(f"| {name} | {count / 1e6:.3f} | {spread} | {diff[name] / 1e6:+.3f} | {share:+.2f}% |")
    return "\n".join(
        [
            f"# Request path in instructions ({report['date']})",
            "",
            f"`python -m benchmarks.request_path_instructions`: {report['requests']} sequential single-image `.npy` "
            "predicts per app, called in process as ASGI apps on uvloop, ResNet-20 `source`, one torch thread, "
            "drift off; instructions counted by callgrind with a fixed hash seed; tta-server's batches run inline "
            "on the event loop as a real server runs them (the child lifts the inline batch's time bound, which a "
            "forward under valgrind exceeds, and fails if a counted batch went to the worker thread). "
            f"Each app counted {report['repeats']} times in its own process, rounds interleaved: median and "
            "min-max (object hashes follow memory addresses, so runs of one tree differ by some thousands of "
            "instructions per request).",
            "",
            "| app | M instructions per request (median) | min-max (M) | minus plain (M) | minus plain |",
            "|---|---:|---:|---:|---:|",
            *rows,
            "",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=100, help="counted sequential requests per app")
    parser.add_argument("--models-dir", type=Path, default=Path("../shared/models").resolve())
    parser.add_argument("--before", type=Path, default=None, help="an older tree of this project to count too")
    parser.add_argument("--repeats", type=int, default=3, help="counts per app, in interleaved rounds")
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
