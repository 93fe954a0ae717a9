"""The one-pass per-sample moments: the same sums as torch, in every layout it serves, and the fallbacks."""

from __future__ import annotations

import pytest
import torch

from adapters import moments
from adapters.moments import instance_var_mean, kernel_available, sample_moments, segment_batch_norm, warm_up
from adapters.segments import segment_moments


def _reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    dims = list(range(2, x.dim()))
    return x.double().sum(dims), (x.double() * x.double()).sum(dims)


def _inputs() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 6, 7, 9, generator=gen) * 3 + 2
    return {"nchw": x, "channels_last": x.contiguous(memory_format=torch.channels_last)}


def test_the_kernel_is_there_and_compiles() -> None:
    assert kernel_available()
    assert warm_up()


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_sums_equal_torch_in_both_layouts(layout: str) -> None:
    x = _inputs()[layout]
    first, second = sample_moments(x)
    want_first, want_second = _reference(x)
    assert first.dtype == torch.float32 and first.shape == (5, 6)
    torch.testing.assert_close(first.double(), want_first, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(second.double(), want_second, rtol=1e-6, atol=1e-5)


def test_instance_statistics_equal_torch_var_mean() -> None:
    x = _inputs()["channels_last"]
    var, mean = instance_var_mean(x)
    want_var, want_mean = torch.var_mean(x.double(), dim=(2, 3), correction=0)
    torch.testing.assert_close(mean.double(), want_mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(var.double(), want_var, rtol=1e-5, atol=1e-5)


def test_the_kernel_runs_where_it_serves_and_torch_everywhere_else(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    real = moments._kernels()
    assert real is not None

    def counting() -> moments.Kernels:
        calls.append("kernel")
        return real

    monkeypatch.setattr(moments, "_kernels", counting)
    x = _inputs()["nchw"]
    sample_moments(x)
    assert calls == ["kernel"]
    others = {
        "float64": x.double(),
        "non-contiguous": x[:, :, ::2],
        "5-D": x[..., None],
        "recording a gradient": x.clone().requires_grad_(True),
    }
    for name, other in others.items():
        first, second = sample_moments(other)
        want_first, want_second = _reference(other.detach())
        torch.testing.assert_close(first.double(), want_first, rtol=1e-5, atol=1e-4, msg=name)
        torch.testing.assert_close(second.double(), want_second, rtol=1e-5, atol=1e-4, msg=name)
    assert calls == ["kernel"], "only the served input reached the kernel"


def test_gradients_flow_through_the_torch_path() -> None:
    x = _inputs()["nchw"].clone().requires_grad_(True)
    first, second = sample_moments(x)
    (grad,) = torch.autograd.grad(first.sum() + second.sum(), [x])
    torch.testing.assert_close(grad, 1 + 2 * x.detach())


def test_without_spatial_dimensions_the_values_are_their_own_sums() -> None:
    x = torch.randn(4, 3)
    first, second = sample_moments(x)
    assert torch.equal(first, x) and torch.equal(second, x * x)


def test_without_numba_the_torch_operations_serve(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(moments, "_SLOT", moments.KernelSlot(None, loaded=True))
    assert not kernel_available()
    x = _inputs()["channels_last"]
    first, second = sample_moments(x)
    want_first, want_second = _reference(x)
    torch.testing.assert_close(first.double(), want_first, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(second.double(), want_second, rtol=1e-5, atol=1e-4)


def test_a_failing_kernel_falls_back_to_torch_for_good(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object) -> None:
        raise RuntimeError("cannot compile here")

    monkeypatch.setattr(
        moments, "_SLOT", moments.KernelSlot(moments.Kernels(broken, broken, broken, broken), loaded=True)
    )
    x = _inputs()["channels_last"]
    first, second = sample_moments(x)
    want_first, want_second = _reference(x)
    torch.testing.assert_close(first.double(), want_first, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(second.double(), want_second, rtol=1e-5, atol=1e-4)
    assert not kernel_available()


def test_without_a_writable_cache_the_kernels_compile_in_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    numba = pytest.importorskip("numba")
    real = numba.njit

    def njit(**options: object) -> object:
        if options.get("cache"):
            raise RuntimeError("cannot cache function: no locator available")
        return real(**options)

    monkeypatch.setattr(numba, "njit", njit)
    kernels = moments._compile()
    assert kernels is not None
    monkeypatch.setattr(moments, "_SLOT", moments.KernelSlot(kernels, loaded=True))
    x = _inputs()["nchw"]
    first, _ = sample_moments(x)
    torch.testing.assert_close(first.double(), _reference(x)[0], rtol=1e-6, atol=1e-5)


def _composed_segment_norm(
    x: torch.Tensor, index: torch.Tensor, sizes: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    var, mean, _ = segment_moments(x.double(), index, sizes)
    view = (-1, x.shape[1], 1, 1)
    scale = torch.rsqrt(var + 1e-5)[index].reshape(view) * weight.double().reshape(1, -1, 1, 1)
    return (x.double() - mean[index].reshape(view)) * scale + bias.double().reshape(1, -1, 1, 1)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("lengths", [(2, 1, 2), (1, 1, 1, 1, 1)])
def test_segment_batch_norm_equals_the_composed_normalization(layout: str, lengths: tuple[int, ...]) -> None:
    x = _inputs()[layout]
    index = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    sizes = torch.tensor(lengths, dtype=torch.float32)
    weight, bias = torch.rand(6) + 0.5, torch.randn(6)
    y = segment_batch_norm(x, index, len(lengths), weight, bias, 1e-5)
    assert y is not None
    assert y.is_contiguous(memory_format=torch.channels_last) == (layout == "channels_last")
    torch.testing.assert_close(y.double(), _composed_segment_norm(x, index, sizes, weight, bias), rtol=1e-5, atol=1e-5)
    plain = segment_batch_norm(x, index, len(lengths), None, None, 1e-5)
    ones, zeros = torch.ones(6), torch.zeros(6)
    assert plain is not None
    torch.testing.assert_close(
        plain.double(), _composed_segment_norm(x, index, sizes, ones, zeros), rtol=1e-5, atol=1e-5
    )


def test_segment_batch_norm_leaves_what_it_does_not_serve_to_the_caller() -> None:
    x = _inputs()["nchw"]
    index = torch.arange(5)
    assert segment_batch_norm(x.double(), index, 5, None, None, 1e-5) is None
    assert segment_batch_norm(x[:, :, :1, :1], index, 5, None, None, 1e-5) is None  # one spatial value
    assert segment_batch_norm(x.clone().requires_grad_(True), index, 5, None, None, 1e-5) is None
