"""What the ``autocast`` setting costs in answers: top-1 agreement of bf16/fp16 autocast with fp32.

    .venv/bin/python -m benchmarks.autocast_agreement                 # CPU, bf16
    .venv/bin/python -m benchmarks.autocast_agreement --device cuda   # bf16 and fp16

The benchmark stream: the first 846 CIFAR-10 test images (``../shared/data/cifar10_test_first846.npz``)
with each of ``--corruptions`` applied at severity 5 (the project's CIFAR-10-C implementation,
seeded), sent in batches of ``--batch-size`` to one stream per method, exactly as the server
steps them (:func:`~tta_server.serving.method_setup.setup_method`, ``model_inputs``,
``adapter.step``). Each forward-only method (the only ones the setting touches) runs the stream
twice, in fp32 and under ``torch.autocast``, each run adapting its own state; reported per
method: the share of images whose top-1 is the same, both accuracies, and the in-process
images/s of both runs (one torch thread on the CPU). Writes JSON and Markdown to
``benchmarks/results/autocast_agreement[_cuda].{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tta_server.data.datasets import load_labeled_images
from tta_server.serving.method_setup import model_inputs, setup_method
from tta_server.serving.model_worker import AUTOCAST_DTYPES, FORWARD_ONLY
from tta_server.shift import corruptions
from tta_server.zoo.catalogue import build_catalogue


def run_stream(
    method: str, images: np.ndarray, batch: int, device: str, models_dir: Path, precision: str | None
) -> tuple[np.ndarray, float]:
    """Top-1 labels of the whole stream through one fresh stream of ``method``, and images/s."""
    catalogue = build_catalogue(models_dir)
    loaded = catalogue.load("resnet20", device)
    setup = setup_method(loaded, method, {}, lambda name: catalogue.load(name, device))
    state = setup.adapter.init_state(setup.model, 0, loaded.sha256)
    labels = []
    started = time.perf_counter()
    for i in range(0, len(images), batch):
        x = model_inputs(images[i : i + batch], setup.spec, device)
        if precision is None:
            result = setup.adapter.step(setup.model, x, state)
        else:
            with torch.autocast("cuda" if device.startswith("cuda") else "cpu", dtype=AUTOCAST_DTYPES[precision]):
                result = setup.adapter.step(setup.model, x, state)
        state = result.state
        labels.append(result.logits.float().argmax(dim=1).cpu().numpy())
    return np.concatenate(labels), len(images) / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precisions", default=None, help="comma-separated: bf16, fp16 (default: bf16 on CPU)")
    parser.add_argument("--corruptions", default="gaussian_noise,contrast")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--data", type=Path, default=Path("../shared/data/cifar10_test_first846.npz"))
    parser.add_argument("--models-dir", type=Path, default=Path("../shared/models"))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    precisions = (args.precisions or ("bf16,fp16" if args.device == "cuda" else "bf16")).split(",")
    data = load_labeled_images(args.data)
    rows: list[dict[str, Any]] = []
    for name in args.corruptions.split(","):
        images = getattr(corruptions, name)(data.x, 5, np.random.default_rng(0))
        for method in sorted(FORWARD_ONLY):
            reference, fp32_rate = run_stream(method, images, args.batch_size, args.device, args.models_dir, None)
            for precision in precisions:
                try:
                    low, low_rate = run_stream(method, images, args.batch_size, args.device, args.models_dir, precision)
                except RuntimeError as exc:  # e.g. CPU batch_norm refuses bf16 input with fp32 statistics
                    rows.append({"corruption": name, "method": method, "precision": precision, "error": str(exc)})
                    print(f"{method} {precision}: {exc}", file=sys.stderr)  # noqa: T201
                    continue
                row = {
                    "corruption": name,
                    "method": method,
                    "precision": precision,
                    "images": len(images),
                    "top1_agreement": float((low == reference).mean()),
                    "accuracy_fp32": float((reference == data.y).mean()),
                    "accuracy_autocast": float((low == data.y).mean()),
                    "images_per_s_fp32": fp32_rate,
                    "images_per_s_autocast": low_rate,
                }
                rows.append(row)
                print(json.dumps(row), file=sys.stderr)  # noqa: T201
    suffix = "" if args.device == "cpu" else f"_{args.device.split(':')[0]}"
    out = args.out or Path(f"benchmarks/results/autocast_agreement{suffix}.json")
    machine = f"{platform.machine()}, {os.cpu_count()} cores"
    if args.device.startswith("cuda"):
        machine += f", {torch.cuda.get_device_name()}"
    report = {"device": args.device, "machine": machine, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    report |= {"batch_size": args.batch_size, "severity": 5, "rows": rows}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        f"# Autocast against fp32 ({args.device}, {machine}, {report['date']})",
        "",
        f"`python -m benchmarks.autocast_agreement`: resnet20, the first {len(data.x)} CIFAR-10 test images, "
        f"severity 5, batches of {args.batch_size}, one stream per run; images/s in-process, one torch thread.",
        "",
        "| corruption | method | autocast | top-1 agreement with fp32 | accuracy fp32 | accuracy autocast "
        "| img/s fp32 | img/s autocast |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['corruption']} | {r['method']} | {r['precision']} | {100 * r['top1_agreement']:.1f}% "
        f"| {100 * r['accuracy_fp32']:.1f}% | {100 * r['accuracy_autocast']:.1f}% "
        f"| {r['images_per_s_fp32']:.0f} | {r['images_per_s_autocast']:.0f} |"
        if "error" not in r
        else f"| {r['corruption']} | {r['method']} | {r['precision']} | fails: `{r['error'][:80]}` | | | | |"
        for r in rows
    ]
    text = "\n".join(lines) + "\n"
    out.with_suffix(".md").write_text(text)
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
