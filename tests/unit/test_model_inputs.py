"""The model's input: a fused batch's segments give the concatenation's input; layout and precision settings."""

from __future__ import annotations

import numpy as np
import torch

from tests.api.helpers import random_images
from tta_server.app import build_services
from tta_server.serving.method_setup import model_inputs
from tta_server.settings import Settings
from tta_server.zoo.catalogue import build_catalogue


def test_segments_give_the_concatenations_input(settings: Settings) -> None:
    spec = build_catalogue(settings.models_dir).get("resnet20")
    parts = [random_images(n, seed=n) for n in (1, 3, 2)]
    fused = model_inputs(parts, spec, "cpu")
    assert torch.equal(fused, model_inputs(np.concatenate(parts), spec, "cpu"))
    assert fused.shape == (6, 3, spec.input_size, spec.input_size)


def test_channels_last_is_a_layout_not_a_value(settings: Settings) -> None:
    spec = build_catalogue(settings.models_dir).get("resnet20")
    images = random_images(4)
    nhwc = model_inputs(images, spec, "cpu", channels_last=True)
    nchw = model_inputs(images, spec, "cpu", channels_last=False)
    assert nhwc.is_contiguous(memory_format=torch.channels_last)
    assert nchw.is_contiguous()
    assert torch.equal(nhwc, nchw)


def test_autocast_applies_on_cuda_only(settings: Settings) -> None:
    services = build_services(settings.model_copy(update={"autocast": "bf16"}))
    try:
        assert services.streams.worker.autocast is None  # CPU: bf16 batch_norm would fail the BN methods
    finally:
        services.decoder.close()
        services.streams.close()
