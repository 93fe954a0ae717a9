"""The model's input: a fused batch's segments give the concatenation's input; layout and precision settings."""

from __future__ import annotations

import numpy as np
import torch

from tests.api.helpers import random_images
from tta_server.app import build_services
from tta_server.serving.method_setup import model_inputs
from tta_server.serving.model_worker import host_probabilities
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


def test_host_probabilities_are_the_float32_softmax_whatever_the_logits() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.0, 0.0, 3.0]])
    expected = torch.softmax(logits, dim=1).numpy()
    same = host_probabilities(logits)
    assert same.dtype == np.float32
    np.testing.assert_array_equal(same, expected)
    with torch.enable_grad():
        learning = logits.double().requires_grad_() * 1.0  # a gradient method's logits: float64, in a graph
        from_graph = host_probabilities(learning)
    assert from_graph.dtype == np.float32
    np.testing.assert_allclose(from_graph, expected, rtol=1e-6)
    half = host_probabilities(logits.to(torch.bfloat16))  # autocast's logits
    assert half.dtype == np.float32
    np.testing.assert_allclose(half, expected, atol=1e-2)
