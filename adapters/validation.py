"""Checks that a state handed to a method (an import, a restore) is one the method could have made.

Why here and not in the server: only the method knows which tensors it keeps, which of them
may grow (CEMA's buffers) and where NaN is a legitimate "no value yet" marker (SAR's loss EMA,
CEMA's warm-up entropy). Every check raises :class:`StateMismatchError` naming the tensor or
field, which the server answers with 422 before anything is stored.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import torch

from adapters.errors import StateMismatchError

MAX_ABS_VALUE = 1e12
"""Largest magnitude a state value may hold: squares stay far below float32's 3.4e38, so no
statistic or moment computed from an imported state overflows to infinity."""

MAX_STEP = 10**12
"""Largest step count a state may claim (a trillion adaptation steps is no real stream)."""

_CHUNK_KEY = re.compile(r"^(?P<seq>\d{10})/(?P<part>q|scale|offset)$")


def check_same_tensors(
    got: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor], names: Iterable[str] | None = None
) -> None:
    """``got`` holds exactly the tensors of ``reference`` (restricted to ``names``), with their shapes and dtypes."""
    wanted = set(reference if names is None else names)
    present = set(got) & wanted if names is not None else set(got)
    missing = sorted(wanted - set(got))
    extra = sorted(present - wanted) if names is None else []
    if missing or extra:
        raise StateMismatchError(f"state tensors differ: missing {missing[:5]}, unexpected {extra[:5]}")
    for name in sorted(wanted):
        have, ref = got[name], reference[name]
        if have.shape != ref.shape or have.dtype != ref.dtype:
            raise StateMismatchError(
                f"tensor '{name}' is {have.dtype} {tuple(have.shape)}, expected {ref.dtype} {tuple(ref.shape)}"
            )


def check_values(tensors: Mapping[str, torch.Tensor], nan_markers: Iterable[str] = ()) -> None:
    """Floating tensors finite and within :data:`MAX_ABS_VALUE`; NaN allowed only in ``nan_markers``."""
    allowed = set(nan_markers)
    for name, value in tensors.items():
        if not value.is_floating_point() or value.numel() == 0:
            continue
        finite = torch.isfinite(value)
        if name in allowed:
            finite = finite | torch.isnan(value)
        if not bool(finite.all()):
            raise StateMismatchError(f"tensor '{name}' holds NaN or infinite values")
        magnitude = float(value.detach().abs().nan_to_num(0.0).max())
        if magnitude > MAX_ABS_VALUE:
            raise StateMismatchError(
                f"tensor '{name}' holds a value of magnitude {magnitude:.3g} (limit {MAX_ABS_VALUE:g})"
            )


def check_step(step: int) -> None:
    """A step count is a non-negative integer below :data:`MAX_STEP`."""
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= MAX_STEP:
        raise StateMismatchError(f"state step {step!r} is not an integer in 0..{MAX_STEP}")


def check_fifo_buffer(
    tensors: Mapping[str, torch.Tensor], prefix: str, capacity: int, sample_shape: tuple[int, ...]
) -> None:
    """The chunks of a quantized FIFO (:mod:`adapters.replay`) under ``prefix`` are well formed.

    Each chunk is ``<10 digits>/q`` (uint8, N x sample_shape) with ``scale``/``offset`` (float32,
    N x channels); the total is within ``capacity``.
    """
    chunks: dict[str, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        if not name.startswith(prefix):
            continue
        found = _CHUNK_KEY.match(name[len(prefix) :])
        if found is None:
            raise StateMismatchError(f"unexpected buffer tensor '{name}'")
        chunks.setdefault(found["seq"], {})[found["part"]] = value
    total = 0
    for seq, parts in sorted(chunks.items()):
        if set(parts) != {"q", "scale", "offset"}:
            raise StateMismatchError(
                f"buffer chunk '{prefix}{seq}' lacks {sorted({'q', 'scale', 'offset'} - set(parts))}"
            )
        codes, scale, offset = parts["q"], parts["scale"], parts["offset"]
        n = int(codes.shape[0]) if codes.dim() else -1
        if codes.dtype != torch.uint8 or tuple(codes.shape[1:]) != sample_shape or n < 1:
            raise StateMismatchError(
                f"buffer chunk '{prefix}{seq}/q' is {codes.dtype} {tuple(codes.shape)}, "
                f"expected uint8 N x {' x '.join(map(str, sample_shape))}"
            )
        for part, value in (("scale", scale), ("offset", offset)):
            if value.dtype != torch.float32 or tuple(value.shape) != (n, sample_shape[0]):
                raise StateMismatchError(
                    f"buffer chunk '{prefix}{seq}/{part}' is {value.dtype} {tuple(value.shape)}, "
                    f"expected float32 {n} x {sample_shape[0]}"
                )
        total += n
    if total > capacity:
        raise StateMismatchError(f"buffer '{prefix}' holds {total} samples, over its capacity of {capacity}")
