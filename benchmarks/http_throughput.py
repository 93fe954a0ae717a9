"""Images/s through the HTTP server versus a raw torch forward of the same model, in one run.

    .venv/bin/python -m benchmarks.http_throughput --model resnet20 --batch-size 64 --seconds 15

For each method a stream is registered and clients POST .npy batches of ``--batch-size``
images back to back (``--concurrency`` in flight, so the next batch waits in the queue while
one runs). The raw baseline is ``model(x)`` on a pre-normalized batch of the same size with
the same torch thread count, measured in this process before the server starts; the
method's own in-process ``adapter.step`` rate is measured too, so that serving overhead
(server / step) and method cost (step / raw) can be told apart. Prints a
Markdown table and writes JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import torch

import adapters
from tta_server.zoo.catalogue import build_catalogue
from tta_server.zoo.transforms import normalize, to_tensor_batch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def raw_forward(model_name: str, models_dir: Path, batch: int, seconds: float, threads: int) -> float:
    """Images/s of ``model(x)`` alone (no decoding, no HTTP, no adaptation)."""
    torch.set_num_threads(threads)
    loaded = build_catalogue(models_dir).load(model_name)
    images = np.random.default_rng(0).integers(0, 256, (batch, 32, 32, 3), dtype=np.uint8)
    x = normalize(to_tensor_batch(images), loaded.spec.mean, loaded.spec.std)
    with torch.inference_mode():
        for _ in range(3):
            loaded.model(x)
        done, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            loaded.model(x)
            done += batch
    return done / (time.perf_counter() - start)


def in_process_step(model_name: str, method: str, models_dir: Path, batch: int, seconds: float) -> float:
    """Images/s of ``adapter.step`` in this process: the method's own cost, without HTTP."""
    loaded = build_catalogue(models_dir).load(model_name)
    adapter = adapters.create_adapter(method)
    prepared = adapter.prepare(copy.deepcopy(loaded.model))
    state = adapter.init_state(prepared, 0, loaded.sha256)
    images = np.random.default_rng(0).integers(0, 256, (batch, 32, 32, 3), dtype=np.uint8)
    x = normalize(to_tensor_batch(images), loaded.spec.mean, loaded.spec.std)
    for _ in range(3):
        state = adapter.step(prepared, x, state).state
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        state = adapter.step(prepared, x, state).state
        done += batch
    return done / (time.perf_counter() - start)


def start_server(port: int, models_dir: Path, model: str, threads: int, max_batch: int) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "TTA_PORT": str(port),
        "TTA_MODELS_DIR": str(models_dir),
        "TTA_PRELOAD_MODELS": json.dumps([model]),
        "TTA_LOG_LEVEL": "warning",
        "TTA_MAX_BATCH_SIZE": str(max_batch),
        "TTA_DRIFT_SAMPLE_EVERY": "0",
        "TTA_TORCH_THREADS": str(threads),
    }
    cmd = [sys.executable, "-m", "tta_server.cli", "serve", "--device", "cpu"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read().decode() if proc.stderr else ''}")
        time.sleep(0.25)
    proc.kill()
    raise RuntimeError("server did not become ready within 120 s")


def drive(
    base: str, stream: str, body: bytes, batch: int, seconds: float, concurrency: int
) -> tuple[float, list[float]]:
    """Send batches back to back from ``concurrency`` threads; return images/s and latencies."""
    latencies: list[float] = []
    lock = threading.Lock()
    stop = time.monotonic() + seconds
    count = [0]

    def worker() -> None:
        with httpx.Client(base_url=base, timeout=60) as client:
            while time.monotonic() < stop:
                t0 = time.perf_counter()
                r = client.post(
                    f"/v1/streams/{stream}/predict", content=body, headers={"content-type": "application/x-npy"}
                )
                r.raise_for_status()
                with lock:
                    latencies.append(time.perf_counter() - t0)
                    count[0] += batch

    start = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return count[0] / (time.perf_counter() - start), latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--methods", default="source,bn,alpha_bn,unmix_tns")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--models-dir", type=Path, default=Path("../shared/models"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/http_throughput.json"))
    args = parser.parse_args()

    raw = raw_forward(args.model, args.models_dir, args.batch_size, args.seconds, args.threads)
    methods = args.methods.split(",")
    steps = {m: in_process_step(args.model, m, args.models_dir, args.batch_size, args.seconds / 2) for m in methods}
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    images = np.random.default_rng(1).integers(0, 256, (args.batch_size, 32, 32, 3), dtype=np.uint8)
    buf = io.BytesIO()
    np.save(buf, images)
    rows = []
    proc = start_server(port, args.models_dir, args.model, args.threads, args.batch_size)
    try:
        for method in methods:
            stream = f"bench-{method}"
            r = httpx.post(f"{base}/v1/streams", json={"model": args.model, "method": method, "stream_id": stream})
            r.raise_for_status()
            drive(base, stream, buf.getvalue(), args.batch_size, 2.0, args.concurrency)  # warm-up
            rate, lat = drive(base, stream, buf.getvalue(), args.batch_size, args.seconds, args.concurrency)
            q = statistics.quantiles(lat, n=100)
            rows.append(
                {
                    "method": method,
                    "server_images_per_s": rate,
                    "ratio": rate / raw,
                    "in_process_step_images_per_s": steps[method],
                    "ratio_to_step": rate / steps[method],
                    "p50_s": q[49],
                    "p99_s": q[98],
                    "requests": len(lat),
                }
            )
    finally:
        proc.terminate()
        proc.wait(10)
    result = {
        "model": args.model,
        "batch_size": args.batch_size,
        "threads": args.threads,
        "concurrency": args.concurrency,
        "seconds": args.seconds,
        "raw_images_per_s": raw,
        "rows": rows,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"raw forward ({args.model}, batch {args.batch_size}, {args.threads} threads): {raw:.0f} images/s",
        "",
        "| method | server images/s | ratio to raw forward | in-process adapter step images/s | server / step "
        "| p50 latency | p99 latency |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['method']} | {r['server_images_per_s']:.0f} | {r['ratio']:.2f} "
        f"| {r['in_process_step_images_per_s']:.0f} "
        f"| {r['ratio_to_step']:.2f} | {1000 * r['p50_s']:.0f} ms "
        f"| {1000 * r['p99_s']:.0f} ms |"
        for r in rows
    ]
    sys.stdout.write("\n".join(lines) + "\n")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
