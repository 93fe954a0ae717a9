from __future__ import annotations

import torch

from tta_server.training.augment import random_crop_flip


def test_crop_flip_is_deterministic_per_generator_and_keeps_pixels() -> None:
    x = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    a = random_crop_flip(x, torch.Generator().manual_seed(1))
    b = random_crop_flip(x, torch.Generator().manual_seed(1))
    c = random_crop_flip(x, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == x.shape and a.dtype == torch.uint8


def test_zero_offset_without_flip_is_identity() -> None:
    x = torch.randint(1, 256, (1, 3, 8, 8), dtype=torch.uint8)
    outs = [random_crop_flip(x, torch.Generator().manual_seed(s), pad=0) for s in range(8)]
    # with pad=0 the crop is the image itself; only the flip varies
    assert all(torch.equal(o, x) or torch.equal(o, x.flip(-1)) for o in outs)
    assert any(torch.equal(o, x) for o in outs) and any(torch.equal(o, x.flip(-1)) for o in outs)
