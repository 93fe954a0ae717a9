"""The docs overview image: one picture under all 15 corruptions x 5 severities.

Regenerate with ``python -m tta_server.shift.figure [--data PATH] [--index I] [--out PATH]``
(defaults: image 7 of ``../shared/data/cifar10_test_first846.npz``, ``docs/corruptions.png``).
Tiles are enlarged with nearest-neighbour sampling so every original pixel stays visible.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from tta_server.data.datasets import load_labeled_images
from tta_server.shift.corruptions import CORRUPTIONS, SEVERITIES, corrupt

SCALE = 4
GAP = 4
LABEL_WIDTH = 120
HEADER = 18


def corruption_grid(image: np.ndarray, seed: int = 0, scale: int = SCALE) -> Image.Image:
    """A grid image: one row per corruption, the clean image then severities 1-5 as columns."""
    h, w, _ = image.shape
    tile_h, tile_w = h * scale, w * scale
    columns = 1 + len(SEVERITIES)
    width = LABEL_WIDTH + columns * (tile_w + GAP)
    height = HEADER + len(CORRUPTIONS) * (tile_h + GAP)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for col, title in enumerate(["clean", *(f"severity {s}" for s in SEVERITIES)]):
        draw.text((LABEL_WIDTH + col * (tile_w + GAP) + 4, 3), title, fill="black")
    batch = image[None]
    for row, name in enumerate(CORRUPTIONS):
        top = HEADER + row * (tile_h + GAP)
        draw.text((4, top + tile_h // 2 - 6), name, fill="black")
        tiles = [image] + [corrupt(batch, name, s, seed)[0] for s in SEVERITIES]
        for col, tile in enumerate(tiles):
            big = Image.fromarray(tile).resize((tile_w, tile_h), Image.Resampling.NEAREST)
            canvas.paste(big, (LABEL_WIDTH + col * (tile_w + GAP), top))
    return canvas


def main(argv: list[str] | None = None) -> None:
    """Write the overview PNG (see the module docstring for the options)."""
    parser = argparse.ArgumentParser(description="Draw one image under every corruption and severity.")
    parser.add_argument("--data", type=Path, default=Path("../shared/data/cifar10_test_first846.npz"))
    parser.add_argument("--index", type=int, default=7)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale", type=int, default=SCALE)
    parser.add_argument("--out", type=Path, default=Path("docs/corruptions.png"))
    args = parser.parse_args(argv)
    data = load_labeled_images(args.data)
    grid = corruption_grid(data.x[args.index], args.seed, args.scale)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(args.out, optimize=True)


if __name__ == "__main__":
    main()
