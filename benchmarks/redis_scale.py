"""Redis store at scale: memory per registered stream, and state load/save latency per model and method.

    .venv/bin/python -m benchmarks.redis_scale --url redis://127.0.0.1:6379/0 --streams 10000

1. Registers ``--streams`` streams through :class:`RedisStateStore.create_stream` (the
   server's own path: index MULTI + create script) and reports Redis ``used_memory``
   (INFO memory) before and after, per stream, plus the registration latency.
2. For every catalogue model and each of ``--methods``, builds the method's initial state
   (``create_adapter(m).init_state(prepare(model))``), writes it to ``--ops`` of those streams
   and reads it back, reporting p50/p99 of: ``save`` (serialize to safetensors + compare-and-set
   script), ``load cold`` (a store without hot cache: fetch + deserialize, what a replica pays
   after another replica wrote), ``load hot`` (the hot cache is current: the version check
   only, what the serving path pays when one replica serves a stream), Redis memory per
   stream with that state, and the share of safetensors encoding / decoding alone.

All keys live under a unique prefix that is deleted at the end (``--keep`` keeps them).
Prints a Markdown table and writes JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
import uuid
from collections.abc import Callable
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Any

import redis
import torch

from adapters import create_adapter
from adapters.serialize import state_from_bytes, state_to_bytes
from tta_server.state.base import StreamKey, StreamRecord
from tta_server.state.redis import RedisStateStore
from tta_server.zoo.catalogue import LoadedModel, build_catalogue

TENANT = "bench"


def used_memory(client: redis.Redis) -> int:
    info: dict[str, Any] = client.info("memory")
    return int(info["used_memory"])


def percentile(samples: list[float], q: float) -> float:
    """The ``q``-quantile (0..1) of ``samples`` by nearest rank."""
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


def timed(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return (time.perf_counter() - started) * 1000


def summary_ms(samples: list[float]) -> dict[str, float]:
    return {"p50_ms": round(percentile(samples, 0.5), 3), "p99_ms": round(percentile(samples, 0.99), 3)}


def register(store: RedisStateStore, client: redis.Redis, count: int) -> dict[str, Any]:
    """Register ``count`` streams; Redis memory per stream and registration latency."""
    before = used_memory(client)
    latencies = []
    for i in range(count):
        record = StreamRecord(StreamKey(TENANT, f"s{i:06d}"), "resnet20", "bn", {}, i, created_at=time.time())
        latencies.append(timed(partial(store.create_stream, record)))
    after = used_memory(client)
    return {
        "streams": count,
        "used_memory_before": before,
        "used_memory_after": after,
        "bytes_per_stream": round((after - before) / count, 1),
        "create": summary_ms(latencies),
        "total": store.count(),
    }


def measure_state(
    writer: RedisStateStore,
    cold: RedisStateStore,
    hot: RedisStateStore,
    client: redis.Redis,
    loaded: LoadedModel,
    method: str,
    ops: int,
    first: int,
) -> dict[str, Any]:
    """Save / load latencies of one (model, method) state over ``ops`` streams starting at ``first``."""
    adapter = create_adapter(method)
    prepared = adapter.prepare(copy.deepcopy(loaded.model))
    state = adapter.init_state(prepared, 0, loaded.sha256)
    keys = [StreamKey(TENANT, f"s{i:06d}") for i in range(first, first + ops)]
    before = used_memory(client)
    saves = [timed(partial(writer.save_state, key, state, 0, 1)) for key in keys]
    after = used_memory(client)
    saves += [timed(partial(writer.save_state, key, state, 1, 2)) for key in keys]
    cold_loads = [timed(partial(cold.load_state, key)) for key in keys]
    for key in keys:  # fill the hot cache, then time the version check
        hot.get_stream(key)
        hot.load_state(key)
    hot_loads = [timed(partial(hot.load_state, key)) for key in keys]
    blob = state_to_bytes(state)
    encode = [timed(partial(state_to_bytes, state)) for _ in keys]
    decode = [timed(partial(state_from_bytes, blob)) for _ in keys]
    return {
        "model": loaded.spec.name,
        "method": method,
        "state_bytes": len(state_to_bytes(state)),
        "tensors": len(state.tensors),
        "save": summary_ms(saves),
        "load_cold": summary_ms(cold_loads),
        "load_hot": summary_ms(hot_loads),
        "to_bytes": summary_ms(encode),
        "from_bytes": summary_ms(decode),
        "redis_bytes_per_stream_with_state": round((after - before) / ops, 1),
    }


def markdown(result: dict[str, Any]) -> str:
    reg = result["registry"]
    lines = [
        f"Registered {reg['streams']:,} streams: Redis used_memory {reg['used_memory_before']:,} -> "
        f"{reg['used_memory_after']:,} bytes = **{reg['bytes_per_stream']:.0f} bytes per stream** "
        f"(registration + index members); create p50 {reg['create']['p50_ms']:.2f} ms, "
        f"p99 {reg['create']['p99_ms']:.2f} ms.",
        "",
        "| model | method | state bytes | Redis bytes/stream (with state) | save p50 / p99 ms "
        "| load cold p50 / p99 ms | load hot p50 / p99 ms | of which to / from bytes p50 ms |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["states"]:
        lines.append(
            f"| {row['model']} | {row['method']} | {row['state_bytes']:,} "
            f"| {row['redis_bytes_per_stream_with_state']:,.0f} "
            f"| {row['save']['p50_ms']:.2f} / {row['save']['p99_ms']:.2f} "
            f"| {row['load_cold']['p50_ms']:.2f} / {row['load_cold']['p99_ms']:.2f} "
            f"| {row['load_hot']['p50_ms']:.2f} / {row['load_hot']['p99_ms']:.2f} "
            f"| {row['to_bytes']['p50_ms']:.2f} / {row['from_bytes']['p50_ms']:.2f} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--streams", type=int, default=10_000)
    parser.add_argument("--ops", type=int, default=200, help="streams written and read per (model, method)")
    parser.add_argument("--models", nargs="*", default=None, help="default: every catalogue model")
    parser.add_argument("--methods", nargs="*", default=["bn", "unmix_tns", "sar", "tent"])
    parser.add_argument("--models-dir", type=Path, default=Path("../shared/models"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/redis_scale.json"))
    parser.add_argument("--keep", action="store_true", help="keep the benchmark's keys in Redis")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    catalogue = build_catalogue(args.models_dir)
    models = args.models or catalogue.names()
    if args.ops * len(models) * len(args.methods) > args.streams:
        raise SystemExit(f"--ops x models x methods must not exceed --streams ({args.streams})")
    prefix = f"tta-bench-{uuid.uuid4().hex[:8]}"
    client = redis.Redis.from_url(args.url)
    cache = args.ops + 1
    writer = RedisStateStore(args.url, key_prefix=prefix, cache_max_streams=0)
    cold = RedisStateStore(args.url, key_prefix=prefix, cache_max_streams=0)
    hot = RedisStateStore(args.url, key_prefix=prefix, cache_max_streams=cache)
    started = time.time()
    try:
        registry = register(writer, client, args.streams)
        states = []
        first = 0
        for model in models:
            loaded = catalogue.load(model)
            for method in args.methods:
                states.append(measure_state(writer, cold, hot, client, loaded, method, args.ops, first))
                first += args.ops
    finally:
        for store in (writer, cold, hot):
            store.close()
        if not args.keep:
            for _ in range(10_000):  # bounded: delete in chunks of 5000 keys
                keys = list(islice(client.scan_iter(match=f"{prefix}:*", count=5000), 5000))
                if not keys:
                    break
                client.delete(*keys)
    server: dict[str, Any] = client.info("server")
    client.close()
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "seconds": round(time.time() - started, 1),
        "machine": {"platform": platform.platform(), "cpus": _cpus(), "python": platform.python_version()},
        "redis_version": server.get("redis_version"),
        "url": args.url.rsplit("@", maxsplit=1)[-1],
        "registry": registry,
        "states": states,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(result)
    args.out.with_suffix(".md").write_text(table + "\n")
    sys.stdout.write(table + "\n")
    sys.stdout.write(f"\n{result['seconds']} s, {result['machine']}, Redis {result['redis_version']}\n")
    return 0


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


if __name__ == "__main__":
    sys.exit(main())
