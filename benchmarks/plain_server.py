"""The baseline for serving overhead: a plain FastAPI + torch server, the same body format as tta-server.

    .venv/bin/python -m benchmarks.plain_server --port 8001 --model resnet20 --threads 1

What a competent engineer writes in an afternoon when told "put ResNet-20 behind HTTP": one
route, ``POST /predict``, that reads a ``.npy`` uint8 N x H x W x 3 body (the header parsed by
hand, the pixels read with ``np.frombuffer``, no copy), normalizes it with the catalogue
model's mean and std, runs the model inline on the event loop under ``torch.inference_mode``
and answers the top-1 class and probability per image as JSON. No streams, no adaptation, no
queue, no admission, no metrics, no auth: whatever tta-server spends per request beyond this is
the cost of what it adds. ``benchmarks.fused_streams`` starts it as a subprocess and sends it
exactly the bodies it sends tta-server. Its response stays at the top-1 level, so the
comparison is not flattered by a shorter answer: tta-server's default answer carries top-5.
"""

from __future__ import annotations

import argparse
import ast
import json
import struct
from pathlib import Path

import numpy as np
import torch
from fastapi import FastAPI, Request, Response

from tta_server.allocator import keep_freed_memory
from tta_server.zoo.catalogue import build_catalogue
from tta_server.zoo.transforms import normalize, to_tensor_batch


def parse_npy(body: bytes) -> np.ndarray:
    """A ``.npy`` uint8 body as an array viewing the body's bytes (version 1 header; no ``np.load``)."""
    if body[:6] != b"\x93NUMPY":
        raise ValueError("not a .npy body")
    (length,) = struct.unpack("<H", body[8:10])
    header = ast.literal_eval(body[10 : 10 + length].decode("latin1"))
    return np.frombuffer(body, dtype=np.uint8, offset=10 + length).reshape(header["shape"])


def create_plain_app(model_name: str, models_dir: Path, device: str = "cpu") -> FastAPI:
    """The one-route app: the catalogue's ``model_name`` in eval mode on ``device``, answering top-1 per image."""
    loaded = build_catalogue(models_dir).load(model_name, device)
    model, spec = loaded.model.eval(), loaded.spec
    app = FastAPI()

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/predict")
    async def predict(request: Request) -> Response:
        images = parse_npy(await request.body())
        with torch.inference_mode():
            probs = torch.softmax(model(normalize(to_tensor_batch(images).to(device), spec.mean, spec.std)), dim=1)
        top_p, top_c = probs.max(dim=1)
        answer = [
            {"label": c, "class_name": spec.classes[c], "probability": p}
            for c, p in zip(top_c.tolist(), top_p.tolist(), strict=True)
        ]
        return Response(json.dumps({"predictions": answer}), media_type="application/json")

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--models-dir", type=Path, default=Path("../shared/models"))
    parser.add_argument("--threads", type=int, default=1, help="torch threads (tta-server's TTA_TORCH_THREADS)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    keep_freed_memory()  # the same allocator setting as tta-server: a like-for-like baseline
    import uvicorn

    app = create_plain_app(args.model, args.models_dir, args.device)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
