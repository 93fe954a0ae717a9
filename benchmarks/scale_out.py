"""Scale-out on one machine: 3 replicas behind the stream-affine proxy vs 1 replica vs random routing.

    .venv/bin/python -m benchmarks.scale_out --requests 90 --repeats 2

Three configurations, all through docker/haproxy/haproxy.cfg (so the proxy's cost is in every
row), all on one shared Redis (``--redis``, a key prefix of this run, deleted afterwards):

- ``1 replica``: the proxy's three servers are the same process;
- ``3 replicas, hash``: three processes, consistent hashing on the stream id (production config);
- ``3 replicas, random``: the same three processes, ``balance random`` (``TTA_PROXY_RANDOM``).

Each repetition sends ``--requests`` predict requests (``--batch-size`` random 32x32 images as
.npy) for ``--streams`` streams from ``--clients`` client threads, every stream's requests in
order, and the configurations are interleaved within each repetition, so drift of the shared
machine's load hits all of them alike. Measured per run: images/s, and from every replica's
/metrics the change of ``tta_store_cache_total`` (hit: the state was served from the hot cache,
only its version checked in Redis; miss: the state's bytes were read and deserialized) and of
version conflicts (compare-and-set lost, step recomputed). Writes JSON and Markdown.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import redis

from tests.support.processes import free_port, wait_until_ready
from tests.support.proxy import Proxy, haproxy_binary

REPO = Path(__file__).resolve().parents[1]
CONFIGS = ("1 replica", "3 replicas, hash", "3 replicas, random")


@dataclass
class Server:
    port: int
    proc: subprocess.Popen[bytes]

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def start_server(redis_url: str, prefix: str, models_dir: Path, method_threads: int, log: Path) -> Server:
    port = free_port()
    env = {
        **os.environ,
        "TTA_REDIS_KEY_PREFIX": prefix,
        "TTA_DRIFT_SAMPLE_EVERY": "0",
        "TTA_TORCH_THREADS": str(method_threads),
        "OMP_NUM_THREADS": str(method_threads),
    }
    command = [str(REPO / ".venv" / "bin" / "tta-server"), "serve", "--port", str(port), "--store", redis_url]
    command += ["--models-dir", str(models_dir), "--device", "cpu", "--log-level", "warning"]
    with log.open("wb") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    return Server(port, proc)


def wait_ready(server: Server, seconds: float = 120.0) -> None:
    wait_until_ready(server.proc, f"{server.base}/readyz", seconds, f"server on {server.port}")


def counters(server: Server) -> dict[str, float]:
    """Hot-cache hits/misses, version conflicts and predicts served, from one replica's /metrics."""
    text = httpx.get(f"{server.base}/metrics", timeout=10).text
    out = {"hit": 0.0, "miss": 0.0, "conflicts": 0.0, "predicts": 0.0}
    for line in text.splitlines():
        if line.startswith("tta_store_cache_total{"):
            result = re.search(r'result="(\w+)"', line)
            if result:
                out[result.group(1)] += float(line.rsplit(" ", 1)[1])
        elif line.startswith('tta_store_errors_total{operation="version_conflict"}'):
            out["conflicts"] += float(line.rsplit(" ", 1)[1])
        elif line.startswith("tta_http_requests_total{") and "/predict" in line and 'status="200"' in line:
            out["predicts"] += float(line.rsplit(" ", 1)[1])
    return out


def npy(batch: int, seed: int) -> bytes:
    import io

    images = np.random.default_rng(seed).integers(0, 256, (batch, 32, 32, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    np.save(buffer, images)
    return buffer.getvalue()


def drive(base: str, streams: list[str], requests: int, clients: int, batch: int) -> tuple[float, int, int]:
    """Send ``requests`` predicts round-robin over ``streams`` from ``clients`` threads; (seconds, ok, refused)."""
    per_client = [streams[i::clients] for i in range(clients)]
    quota = [requests // clients + (1 if i < requests % clients else 0) for i in range(clients)]
    bodies = [npy(batch, seed) for seed in range(8)]
    ok, refused = [0] * clients, [0] * clients

    def run(index: int) -> None:
        mine = per_client[index]
        with httpx.Client(base_url=base, timeout=120) as http:
            for n in range(quota[index]):
                sid = mine[n % len(mine)]
                response = http.post(
                    f"/v1/streams/{sid}/predict",
                    content=bodies[n % len(bodies)],
                    headers={"content-type": "application/x-npy"},
                )
                if response.status_code == 200:
                    ok[index] += 1
                else:
                    refused[index] += 1

    threads = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - start, sum(ok), sum(refused)


def main() -> None:  # noqa: PLR0912, PLR0915 (one linear procedure)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--models-dir", type=Path, default=REPO.parent / "shared" / "models")
    parser.add_argument("--method", default="unmix_tns")
    parser.add_argument("--streams", type=int, default=12)
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--requests", type=int, default=90, help="predict requests per configuration and repetition")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per server process")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "scale_out")
    args = parser.parse_args()

    binary = haproxy_binary()
    if binary is None:
        raise SystemExit("haproxy is not installed (make proxy)")
    prefix = f"tta-bench-{uuid.uuid4().hex[:8]}"
    logs = Path(os.environ.get("TMPDIR", "/tmp")) / prefix
    logs.mkdir(parents=True)
    servers = [start_server(args.redis, prefix, args.models_dir, args.threads, logs / f"s{i}.log") for i in range(3)]
    proxies: dict[str, Proxy] = {}
    runs: list[dict[str, object]] = []
    try:
        for server in servers:
            wait_ready(server)
        addresses = [f"127.0.0.1:{s.port}" for s in servers]
        proxies["1 replica"] = Proxy(binary, [addresses[0]] * 3, logs / "p1.log")
        proxies["3 replicas, hash"] = Proxy(binary, addresses, logs / "p3.log")
        proxies["3 replicas, random"] = Proxy(binary, addresses, logs / "pr.log", random=True)
        for proxy in proxies.values():
            proxy.start()
        for repeat in range(args.repeats):
            for config in CONFIGS:
                # Fresh streams per run: every run starts from cold caches on every replica.
                streams = [f"r{repeat}-{config[:1]}{config[-4:]}-{i}" for i in range(args.streams)]
                base = proxies[config].base
                with httpx.Client(base_url=base, timeout=60) as http:
                    for sid in streams:
                        body = {"model": "resnet20", "method": args.method, "stream_id": sid}
                        created = http.post("/v1/streams", json=body)
                        created.raise_for_status()
                involved = servers[:1] if config == "1 replica" else servers
                before = [counters(s) for s in involved]
                seconds, ok, refused = drive(base, streams, args.requests, args.clients, args.batch_size)
                after = [counters(s) for s in involved]
                delta = {k: sum(a[k] - b[k] for a, b in zip(after, before, strict=True)) for k in before[0]}
                per_replica = [a["predicts"] - b["predicts"] for a, b in zip(after, before, strict=True)]
                loads = delta["hit"] + delta["miss"]
                run = {
                    "config": config,
                    "repeat": repeat,
                    "seconds": round(seconds, 3),
                    "ok": ok,
                    "refused": refused,
                    "images_per_s": round(ok * args.batch_size / seconds, 1),
                    "cache_hits": delta["hit"],
                    "cache_misses": delta["miss"],
                    "hit_ratio": round(delta["hit"] / loads, 3) if loads else None,
                    "version_conflicts": delta["conflicts"],
                    "predicts_per_replica": per_replica,
                }
                runs.append(run)
                print(json.dumps(run), flush=True)  # noqa: T201
    finally:
        for proxy in proxies.values():
            proxy.stop()
        for server in servers:
            server.proc.terminate()
        for server in servers:
            server.proc.wait(timeout=30)
        client = redis.Redis.from_url(args.redis)
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()

    summary = {}
    for config in CONFIGS:
        mine = [r for r in runs if r["config"] == config]
        rates = [float(str(r["images_per_s"])) for r in mine]
        ratios = [float(str(r["hit_ratio"])) for r in mine if r["hit_ratio"] is not None]
        summary[config] = {
            "images_per_s_median": statistics.median(rates),
            "images_per_s_runs": rates,
            "hit_ratio_median": statistics.median(ratios) if ratios else None,
            "version_conflicts": sum(float(str(r["version_conflicts"])) for r in mine),
            "refused": sum(int(str(r["refused"])) for r in mine),
        }
    meta = {
        "date": time.strftime("%Y-%m-%d"),
        "cpus": os.cpu_count(),
        "load_average_1m_at_end": os.getloadavg()[0],
        "python": platform.python_version(),
        "method": args.method,
        "streams": args.streams,
        "clients": args.clients,
        "batch_size": args.batch_size,
        "requests_per_run": args.requests,
        "repeats": args.repeats,
        "torch_threads_per_server": args.threads,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "summary": summary, "runs": runs}, indent=2))
    lines = [
        f"# Scale-out: {args.method}, {args.streams} streams, {args.clients} clients, batches of {args.batch_size}",
        "",
        f"{meta['date']}, {meta['cpus']} CPUs, one torch thread per server, {args.requests} requests per run, "
        f"{args.repeats} interleaved repetitions; load average at the end {meta['load_average_1m_at_end']:.1f}.",
        "",
        "| configuration | images/s (median; runs) | hot-cache hit ratio | version conflicts | refused |",
        "|---|---:|---:|---:|---:|",
    ]
    for config, row in summary.items():
        runs_text = ", ".join(f"{r:.0f}" for r in row["images_per_s_runs"])  # type: ignore[attr-defined]
        ratio = row["hit_ratio_median"]
        lines.append(
            f"| {config} | {row['images_per_s_median']:.0f} ({runs_text}) | "
            f"{'-' if ratio is None else f'{ratio:.2f}'} | {row['version_conflicts']:.0f} | {row['refused']} |"
        )
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))  # noqa: T201


if __name__ == "__main__":
    main()
