"""SegmentBatchNorm: per-segment batch normalization with its closed-form gradient."""

from __future__ import annotations

import torch

from adapters.segment_norm import SegmentBatchNorm

EPS = 1e-5


def composed(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    index: torch.Tensor,
    sizes: torch.Tensor,
    ref_mean: torch.Tensor,
    ref_var: torch.Tensor,
) -> torch.Tensor:
    """The same normalization written as plain differentiable operations, one segment at a time."""
    out = torch.empty_like(x)
    parts = []
    for s in range(len(sizes)):
        rows = index == s
        seg = x[rows]
        values = seg.numel() // seg.shape[1]
        if values < 2:
            mean, var = ref_mean[s], ref_var[s]
        else:
            dims = [0, *range(2, x.dim())]
            mean = seg.mean(dims)
            var = ((seg - mean.reshape(1, -1, *([1] * (x.dim() - 2)))) ** 2).mean(dims)
        view = [1, -1, *([1] * (x.dim() - 2))]
        y = (seg - mean.reshape(view)) * torch.rsqrt(var.reshape(view) + EPS) * weight[s].reshape(view)
        parts.append((rows, y + bias[s].reshape(view)))
    for rows, y in parts:
        out = out.index_put((rows.nonzero()[:, 0],), y)
    return out


def case(dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(0)
    sizes = torch.tensor([2.0, 1.0, 3.0])
    index = torch.repeat_interleave(torch.arange(3), sizes.long())
    x = (torch.randn(6, 4, 3, 3, generator=gen, dtype=dtype) * 2 + 1).requires_grad_()
    weight = torch.randn(3, 4, generator=gen, dtype=dtype).requires_grad_()
    bias = torch.randn(3, 4, generator=gen, dtype=dtype).requires_grad_()
    ref_mean, ref_var = torch.zeros(3, 4, dtype=dtype), torch.ones(3, 4, dtype=dtype)
    return x, weight, bias, index, sizes, ref_mean, ref_var


def test_forward_and_gradients_match_the_composed_form() -> None:
    x, weight, bias, index, sizes, ref_mean, ref_var = case()
    upstream = torch.randn(6, 4, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    fast = SegmentBatchNorm.apply(x, weight, bias, index, sizes, ref_mean, ref_var, EPS)
    grads_fast = torch.autograd.grad((fast * upstream).sum(), [x, weight, bias])
    slow = composed(x, weight, bias, index, sizes, ref_mean, ref_var)
    grads_slow = torch.autograd.grad((slow * upstream).sum(), [x, weight, bias])
    torch.testing.assert_close(fast, slow)
    for got, want in zip(grads_fast, grads_slow, strict=True):
        torch.testing.assert_close(got, want)


def test_gradcheck_with_a_segment_on_its_reference_statistics() -> None:
    """Segments of 4-D input always have spatial values; a BN1d-like input with a one-sample segment
    (fewer than two values per channel) is normalized with its reference statistics instead."""
    gen = torch.Generator().manual_seed(2)
    sizes = torch.tensor([1.0, 3.0])
    index = torch.tensor([0, 1, 1, 1])
    x = torch.randn(4, 5, dtype=torch.float64, generator=gen).requires_grad_()
    weight = torch.randn(2, 5, dtype=torch.float64, generator=gen).requires_grad_()
    bias = torch.randn(2, 5, dtype=torch.float64, generator=gen).requires_grad_()
    ref_mean = torch.randn(2, 5, dtype=torch.float64, generator=gen)
    ref_var = torch.rand(2, 5, dtype=torch.float64, generator=gen) + 0.5

    def fn(a: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = SegmentBatchNorm.apply(a, w, b, index, sizes, ref_mean, ref_var, EPS)
        return out

    assert torch.autograd.gradcheck(fn, (x, weight, bias))
    y = fn(x, weight, bias)
    expected_lone = (x[0] - ref_mean[0]) * torch.rsqrt(ref_var[0] + EPS) * weight[0] + bias[0]
    torch.testing.assert_close(y[0], expected_lone)


def test_a_broken_segment_leaves_the_others_gradients_finite() -> None:
    x, weight, bias, index, sizes, ref_mean, ref_var = case(torch.float32)
    poisoned = x.detach().clone()
    poisoned[0] = float("nan")  # segment 0 (rows 0-1)
    poisoned.requires_grad_()
    y = SegmentBatchNorm.apply(poisoned, weight, bias, index, sizes, ref_mean, ref_var, EPS)
    gx, gw, gb = torch.autograd.grad(y.sum(), [poisoned, weight, bias])
    assert torch.isfinite(y[2:]).all() and torch.isfinite(gx[2:]).all()
    assert torch.isfinite(gw[1:]).all() and torch.isfinite(gb[1:]).all()
