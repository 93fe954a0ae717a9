"""A bounded FIFO of uint8-quantized inputs kept inside a stream's state (CEMA's upload/replay buffers).

Why quantized inputs: the server hands methods the *preprocessed* float batch, not the decoded
uint8 images. Each sample is stored as uint8 codes plus a float32 (scale, offset) per sample and
channel (min/max over the spatial dimensions). An input that came from a uint8 image has at most
256 equally spaced levels per channel, so the reconstruction error is below half an original grey
level (exact when the channel spans the full 0..255 range), at 1 byte per value instead of 4.

Why chunks: ``step`` must not mutate the input state, so a single buffer tensor would be copied
whole on every call. The FIFO is split into chunks of at most ``chunk_size`` samples under keys
``<prefix><seq>/q|scale|offset``; appending copies only the last, partly filled chunk and the new
state shares every other chunk tensor with the old one (shared, never written). Everything stays
a flat dict of tensors, so it serializes with safetensors like the rest of the state.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from adapters.functional import Tensors

CODES = "q"
SCALE = "scale"
OFFSET = "offset"
_PARTS = (CODES, SCALE, OFFSET)


def _stat_dims(x: torch.Tensor) -> list[int]:
    """Dimensions a (scale, offset) pair spans: spatial dims for (N, C, ...) inputs, features for (N, D)."""
    return list(range(2, x.dim())) if x.dim() >= 3 else list(range(1, x.dim()))


def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(uint8 codes, scale, offset) with x ≈ codes·scale + offset per sample and channel."""
    dims = _stat_dims(x)
    with torch.no_grad():
        lo = x.amin(dim=dims, keepdim=True).float()
        hi = x.amax(dim=dims, keepdim=True).float()
        scale = ((hi - lo) / 255.0).clamp_min(torch.finfo(torch.float32).tiny)
        codes = ((x.float() - lo) / scale).round().clamp(0, 255).to(torch.uint8)
    return codes, scale.flatten(1), lo.flatten(1)


def dequantize(
    codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The float inputs back from :func:`quantize`'s output."""
    shape = (*scale.shape, *([1] * (codes.dim() - scale.dim())))
    return (codes.float() * scale.reshape(shape) + offset.reshape(shape)).to(dtype)


def chunk_ids(tensors: Mapping[str, torch.Tensor], prefix: str) -> list[str]:
    """Sequence ids of the stored chunks, oldest first (fixed-width, so string order is age order)."""
    ids = {k[len(prefix) :].partition("/")[0] for k in tensors if k.startswith(prefix)}
    return sorted(ids)


def _key(prefix: str, seq: str, part: str) -> str:
    return f"{prefix}{seq}/{part}"


def size(tensors: Mapping[str, torch.Tensor], prefix: str) -> int:
    """Number of samples held under ``prefix``."""
    return sum(int(tensors[_key(prefix, s, CODES)].shape[0]) for s in chunk_ids(tensors, prefix))


def append(
    tensors: Mapping[str, torch.Tensor],
    prefix: str,
    codes: torch.Tensor,
    scale: torch.Tensor,
    offset: torch.Tensor,
    capacity: int,
    chunk_size: int = 256,
) -> Tensors:
    """A new dict with the samples appended and the oldest evicted beyond ``capacity`` (FIFO).

    Entries outside ``prefix`` and untouched chunks are carried over by reference, not copied.
    """
    out = dict(tensors)
    ids = chunk_ids(out, prefix)
    if codes.shape[0] and capacity > 0:
        new = {CODES: codes, SCALE: scale, OFFSET: offset}
        if ids and out[_key(prefix, ids[-1], CODES)].shape[0] + codes.shape[0] <= chunk_size:
            last = ids[-1]
            for part in _PARTS:
                out[_key(prefix, last, part)] = torch.cat([out[_key(prefix, last, part)], new[part]])
        else:
            seq = f"{int(ids[-1]) + 1 if ids else 0:010d}"
            for part in _PARTS:
                out[_key(prefix, seq, part)] = new[part].clone()
            ids.append(seq)
    excess = size(out, prefix) - capacity
    for seq in list(ids):
        if excess <= 0:
            break
        count = int(out[_key(prefix, seq, CODES)].shape[0])
        if count <= excess:
            for part in _PARTS:
                del out[_key(prefix, seq, part)]
            excess -= count
        else:
            for part in _PARTS:
                out[_key(prefix, seq, part)] = out[_key(prefix, seq, part)][excess:].clone()
            excess = 0
    return out


def take(
    tensors: Mapping[str, torch.Tensor], prefix: str, indices: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes, scale, offset) of the samples at ``indices`` (positions in FIFO order, oldest = 0)."""
    parts: dict[str, list[torch.Tensor]] = {p: [] for p in _PARTS}
    order: list[torch.Tensor] = []
    start = 0
    for seq in chunk_ids(tensors, prefix):
        count = int(tensors[_key(prefix, seq, CODES)].shape[0])
        mask = (indices >= start) & (indices < start + count)
        if bool(mask.any()):
            local = (indices[mask] - start).to(tensors[_key(prefix, seq, CODES)].device)
            for part in _PARTS:
                parts[part].append(tensors[_key(prefix, seq, part)][local])
            order.append(torch.nonzero(mask).flatten())
        start += count
    if not order:
        raise IndexError("no samples selected from an empty or too small buffer")
    # restore the order of ``indices``
    inverse = torch.argsort(torch.cat(order).cpu())
    codes, scale, offset = (torch.cat(parts[p])[inverse.to(parts[p][0].device)] for p in _PARTS)
    return codes, scale, offset


def pop_front(
    tensors: Mapping[str, torch.Tensor], prefix: str, count: int
) -> tuple[Tensors, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Remove the ``count`` oldest samples; returns the new dict and the removed samples."""
    taken = take(tensors, prefix, torch.arange(count))
    return append(tensors, prefix, taken[0][:0], taken[1][:0], taken[2][:0], size(tensors, prefix) - count), taken
