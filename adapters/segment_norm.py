"""Batch normalization per segment with its gradient written out: the fused Tent/SAR step's BN layers.

Why: a fused gradient step normalizes every segment (stream) of the concatenated batch with that
segment's own batch statistics and its own affine. Composed from tensor operations (segment sums
of ``x`` and ``x²``, gathers, ``addcmul``), autograd records a dozen batch-sized intermediate
tensors per layer and walks them all backwards; its backward cost more than the convolutions'.
:class:`SegmentBatchNorm` computes the same forward and returns the closed-form gradient of batch
normalization, the one ``torch.nn.functional.batch_norm`` uses, applied per segment:

    x̂ = (x − μ_s)·r_s,  y = x̂·w_s + b_s,  r_s = 1/√(σ²_s + ε), over the M_s values of segment s
    ∂b_s = Σ g,  ∂w_s = Σ g·x̂,  ∂x = w_s·r_s·(g − ∂b_s/M_s − x̂·∂w_s/M_s)

A segment with fewer than two values per channel is normalized with its reference statistics
instead (constants: ``∂x = w_s·r_s·g``), as in the composed form. Every sum is a segment sum over
its own rows, so a broken segment (NaN, inf) cannot leak into the others' gradients.
"""

from __future__ import annotations

from typing import Any

import torch

from adapters.segments import per_sample, segment_moments, segment_sum


class SegmentBatchNorm(torch.autograd.Function):
    """``y = (x − μ_s)·r_s·w_s + b_s`` per segment; gradients for ``x``, ``weight`` and ``bias`` (S, C)."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor,
        index: torch.Tensor,
        sizes: torch.Tensor,
        reference_mean: torch.Tensor,
        reference_var: torch.Tensor,
        eps: float,
    ) -> torch.Tensor:
        var, mean, count = segment_moments(x, index, sizes)
        small = (count < 2)[:, None]
        mean = torch.where(small, reference_mean, mean).to(x.dtype)
        var = torch.where(small, reference_var, var).to(x.dtype)
        rstd = torch.rsqrt(var + eps)
        scale = rstd * weight
        shift = bias - mean * scale
        view = [-1, x.shape[1], *([1] * (x.dim() - 2))]
        ctx.save_for_backward(x, mean, rstd, weight, index, small, count)
        return torch.addcmul(per_sample(shift, index).reshape(view), x, per_sample(scale, index).reshape(view))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, mean, rstd, weight, index, small, count = ctx.saved_tensors
        segments = mean.shape[0]
        dims = list(range(2, x.dim()))
        per_sample_g = grad.sum(dims) if dims else grad
        per_sample_gx = (grad * x).sum(dims) if dims else grad * x
        grad_bias = segment_sum(per_sample_g, index, segments)
        grad_weight = rstd * (segment_sum(per_sample_gx, index, segments) - mean * grad_bias)  # Σ g·x̂
        grad_x = None
        if ctx.needs_input_grad[0]:
            a = weight * rstd
            values = count.to(x.dtype).clamp_min(1.0)[:, None]
            k1 = torch.where(small, 0.0, grad_bias / values)
            k2 = torch.where(small, 0.0, grad_weight / values)
            c = -a * rstd * k2  # ∂x = a·g + c·x + d, the statistics' terms folded per segment and channel
            d = -a * k1 - c * mean
            view = [-1, x.shape[1], *([1] * (x.dim() - 2))]
            grad_x = torch.addcmul(per_sample(d, index).reshape(view), x, per_sample(c, index).reshape(view))
            grad_x.addcmul_(grad, per_sample(a, index).reshape(view))
        return (
            grad_x,
            grad_weight if ctx.needs_input_grad[1] else None,
            grad_bias if ctx.needs_input_grad[2] else None,
            None,
            None,
            None,
            None,
            None,
        )
