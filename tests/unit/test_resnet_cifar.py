from __future__ import annotations

import pytest
import torch

from adapters.norms import ChannelLayerNorm, NormKind, detect_norm_kinds, norm_layers
from tta_server.zoo.resnet_cifar import ShortcutA, cifar_resnet


@pytest.mark.parametrize("norm", list(NormKind))
def test_resnet20_shapes_and_norms(norm: NormKind) -> None:
    model = cifar_resnet(20, norm).eval()
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert detect_norm_kinds(model) == {norm}
    # stem + 3 stages x 3 blocks x 2 norms
    assert len(list(norm_layers(model))) == 19


def test_resnet20_parameter_count_matches_paper() -> None:
    # He et al. 2016 Table 6: ResNet-20 has 0.27M parameters
    n = sum(p.numel() for p in cifar_resnet(20).parameters())
    assert 269_000 < n < 273_000


def test_ln_is_per_sample_over_chw() -> None:
    layer = ChannelLayerNorm(4)
    x = torch.randn(3, 4, 5, 5) * 3 + 2
    y = layer(x)
    assert torch.allclose(y.mean(dim=(1, 2, 3)), torch.zeros(3), atol=1e-5)
    assert torch.allclose(y.var(dim=(1, 2, 3), unbiased=False), torch.ones(3), atol=1e-3)


def test_option_a_shortcut_subsamples_and_pads() -> None:
    x = torch.arange(2 * 16 * 4 * 4, dtype=torch.float32).view(2, 16, 4, 4)
    out = ShortcutA(32)(x)
    assert out.shape == (2, 32, 2, 2)
    assert torch.equal(out[:, 8:24], x[:, :, ::2, ::2])
    assert out[:, :8].abs().sum() == 0 and out[:, 24:].abs().sum() == 0


def test_unsupported_depth_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="depth 21"):
        cifar_resnet(21)
