"""Checks that an imported state fits the stream it is imported into.

An import is a client's claim about a stream's state; nothing of it is trusted until it is
shown to be made by the stream's method, config and model weights, with exactly the tensors
that method keeps.
"""

from __future__ import annotations

import torch

from adapters.base import StreamState
from adapters.errors import StateMismatchError
from tta_server.state.base import StreamRecord


def check_state_fits(incoming: StreamState, reference: StreamState, record: StreamRecord) -> None:
    """Refuse a state made for another method, config or model, or with other tensors."""
    meta = incoming.meta
    if meta.method != record.method:
        raise StateMismatchError(f"state was made by method '{meta.method}', the stream uses '{record.method}'")
    if meta.model_hash != reference.meta.model_hash:
        raise StateMismatchError(
            f"state was made for model weights {meta.model_hash[:12]}, the stream's model has "
            f"{reference.meta.model_hash[:12]}"
        )
    if meta.config != reference.meta.config:
        raise StateMismatchError(f"state was made with config {meta.config}, the stream uses {reference.meta.config}")
    missing = sorted(set(reference.tensors) - set(incoming.tensors))
    extra = sorted(set(incoming.tensors) - set(reference.tensors))
    if missing or extra:
        raise StateMismatchError(f"state tensors differ: missing {missing[:5]}, unexpected {extra[:5]}")
    for name, ref in reference.tensors.items():
        got = incoming.tensors[name]
        if got.shape != ref.shape or got.dtype != ref.dtype:
            raise StateMismatchError(
                f"tensor '{name}' is {got.dtype} {tuple(got.shape)}, expected {ref.dtype} {tuple(ref.shape)}"
            )
        if got.is_floating_point() and not bool(torch.isfinite(got).all()):
            raise StateMismatchError(f"tensor '{name}' holds NaN or infinite values")
