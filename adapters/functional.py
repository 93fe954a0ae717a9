"""Small pure helpers shared by the methods: entropy, per-stream tensor plumbing, functional optimizers.

Why functional: the shared model is frozen and used by every stream, so a method never calls
``optimizer.step()`` on it. Per-stream tensors (norm affine parameters, statistics) enter the
forward through :func:`torch.func.functional_call`, gradients are taken with
:func:`torch.autograd.grad` with respect to those tensors only, and the optimizers below return
*new* tensors instead of updating in place, so the caller's state is never mutated.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from adapters.norms import NormKind, norm_layers
from adapters.packed import PackedTensors

Tensors = dict[str, torch.Tensor]


def qualified(module_name: str, attr: str) -> str:
    """``module.attr``, or ``attr`` alone for the root module (whose name is empty)."""
    return f"{module_name}.{attr}" if module_name else attr


def var_mean(x: torch.Tensor, dims: list[int], correction: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(variance, mean) over ``dims`` from the first two moments, like ``torch.var_mean``.

    ``torch.var_mean`` over conv activations is several times slower on the CPU than the
    convolution that produced them (measured: ~10 ms against 1 ms for the moments of a
    64x16x32x32 batch), which made statistics-based methods cost twice a forward. The moments
    lose a little precision to cancellation (relative error ~1e-6 for activations whose mean
    is twice their std), far below what changes a normalized activation.
    """
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        # reduce the NHWC view so that the innermost (channel) dimension stays contiguous
        x = x.permute(0, 2, 3, 1)
        dims = [{0: 0, 2: 1, 3: 2, 1: 3}[d] for d in dims]
    mean = x.mean(dims)
    count = x.numel() // max(mean.numel(), 1)
    second = (x * x).mean(dims)
    var = (second - mean * mean).clamp_min(0.0)
    if correction:
        var = var * (count / max(count - correction, 1))
    return var, mean


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Per-sample Shannon entropy (nats) of softmax(logits); differentiable, numerically stable."""
    log_p = F.log_softmax(logits, dim=1)
    return -(log_p.exp() * log_p).sum(dim=1)


def entropy_margin(margin: float, num_classes: int) -> float:
    """An entropy threshold given as a fraction of the maximum entropy ln(C), so it transfers across C."""
    return margin * math.log(max(num_classes, 2))


def norm_affine(model: nn.Module, kinds: frozenset[NormKind] | None = None) -> Tensors:
    """Detached copies of the weight and bias of every affine norm layer, keyed by the model's names."""
    out: Tensors = {}
    for name, module in norm_layers(model, kinds):
        for attr in ("weight", "bias"):
            value = getattr(module, attr, None)
            if isinstance(value, torch.Tensor):
                out[qualified(name, attr)] = value.detach().clone()
    return out


def bn_statistics(model: nn.Module) -> Tensors:
    """Detached copies of every BN layer's source running mean and variance, keyed by the model's names."""
    out: Tensors = {}
    for name, module in norm_layers(model, frozenset({NormKind.BN})):
        for attr in ("running_mean", "running_var"):
            value = getattr(module, attr, None)
            if isinstance(value, torch.Tensor):
                out[qualified(name, attr)] = value.detach().clone()
    return out


def modules_of_type(model: nn.Module, cls: type[nn.Module] | tuple[type[nn.Module], ...]) -> list[str]:
    """Qualified names of the modules that are instances of ``cls``, in model order."""
    return [name for name, module in model.named_modules() if isinstance(module, cls)]


def per_layer(names: Iterable[str], attr: str, value: torch.Tensor) -> Tensors:
    """The same per-call tensor for every named layer (e.g. a mixing weight that the layers read)."""
    return {qualified(name, attr): value for name in names}


def prefixed(prefix: str, tensors: Mapping[str, torch.Tensor]) -> Tensors:
    """Add a namespace prefix to every key (state keys are ``namespace/model.name``)."""
    return {prefix + k: v for k, v in tensors.items()}


def unprefixed(prefix: str, tensors: Mapping[str, torch.Tensor]) -> Tensors:
    """The entries of one namespace, with the prefix removed (the model's own names)."""
    n = len(prefix)
    return {k[n:]: v for k, v in tensors.items() if k.startswith(prefix)}


def cloned(tensors: Mapping[str, torch.Tensor]) -> Tensors:
    """Fresh copies: layers may update these in place without touching the caller's state."""
    return {k: v.detach().clone() for k, v in tensors.items()}


def on_device(tensors: Mapping[str, torch.Tensor], device: torch.device) -> Tensors:
    """Move state tensors to the model's device (a no-op when they are already there).

    A tensor already on ``device`` is not passed through ``Tensor.to``: its dispatch costs more
    than the check, per tensor and per stream of a fused step.
    """
    if isinstance(tensors, PackedTensors):
        tensors = tensors.to(device)
    return {k: v if v.device == device else v.to(device) for k, v in tensors.items()}


def kept_on_device(tensors: Mapping[str, torch.Tensor], device: torch.device) -> Mapping[str, torch.Tensor]:
    """:func:`on_device` that keeps a packed state packed (one buffer moved, no named views made)."""
    return tensors.to(device) if isinstance(tensors, PackedTensors) else on_device(tensors, device)


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU for a tensor-less model)."""
    for param in model.parameters():
        return param.device
    for buffer in model.buffers():
        return buffer.device
    return torch.device("cpu")


def forward(model: nn.Module, tensors: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Run the shared ``model`` with per-stream ``tensors`` substituted for its own (by name).

    The substitution lasts for this call only; in-place updates a layer makes to a substituted
    buffer land in the given tensor, never in the shared model.
    """
    out: Any = functional_call(model, dict(tensors), (x,))
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"the model returned {type(out).__name__}, expected a logits tensor")
    return out


def grads_of(loss: torch.Tensor, params: Mapping[str, torch.Tensor]) -> Tensors:
    """Gradients of ``loss`` w.r.t. the per-stream ``params`` only (zeros where unused)."""
    names = list(params)
    grads = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
    return {n: (g if g is not None else torch.zeros_like(params[n])) for n, g in zip(names, grads, strict=True)}


def requiring_grad(params: Mapping[str, torch.Tensor]) -> Tensors:
    """Leaf copies of ``params`` that require grad (the shared model's tensors never do)."""
    return {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}


@torch.no_grad()
def sgd_step(
    params: Mapping[str, torch.Tensor],
    grads: Mapping[str, torch.Tensor],
    momentum_buf: Mapping[str, torch.Tensor],
    lr: float,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
) -> tuple[Tensors, Tensors]:
    """One SGD step as :class:`torch.optim.SGD` (no dampening, no Nesterov); returns new params and buffers.

    The buffers start at zero, which equals torch's first-step ``buf = grad`` because
    ``momentum * 0 + grad == grad``.
    """
    new_params: Tensors = {}
    new_buf: Tensors = {}
    for name, p in params.items():
        g = grads[name].detach()
        if weight_decay:
            g = g + weight_decay * p.detach()
        buf = momentum * momentum_buf[name] + g if momentum else g
        new_buf[name] = buf
        new_params[name] = p.detach() - lr * buf
    return new_params, new_buf


@torch.no_grad()
def adam_step(
    params: Mapping[str, torch.Tensor],
    grads: Mapping[str, torch.Tensor],
    exp_avg: Mapping[str, torch.Tensor],
    exp_avg_sq: Mapping[str, torch.Tensor],
    step: int,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
) -> tuple[Tensors, Tensors, Tensors]:
    """One Adam step as :class:`torch.optim.Adam` (L2 weight decay); ``step`` counts from 1."""
    beta1, beta2 = betas
    bias1 = 1 - beta1**step
    bias2_sqrt = math.sqrt(1 - beta2**step)
    new_p: Tensors = {}
    new_m: Tensors = {}
    new_v: Tensors = {}
    for name, p in params.items():
        g = grads[name].detach()
        if weight_decay:
            g = g + weight_decay * p.detach()
        m = exp_avg[name] * beta1 + (1 - beta1) * g
        v = exp_avg_sq[name] * beta2 + (1 - beta2) * g * g
        denom = v.sqrt() / bias2_sqrt + eps
        new_p[name] = p.detach() - (lr / bias1) * m / denom
        new_m[name] = m
        new_v[name] = v
    return new_p, new_m, new_v


def zeros_like_all(tensors: Mapping[str, torch.Tensor]) -> Tensors:
    """Zero-initialized optimizer moments shaped like ``tensors``."""
    return {k: torch.zeros_like(v) for k, v in tensors.items()}
