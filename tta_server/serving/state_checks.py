"""Checks that an imported state fits the stream it is imported into.

An import is a client's claim about a stream's state; nothing of it is trusted until it is
shown to be made by the stream's method, config and model weights, with exactly the tensors
that method keeps.
"""

from __future__ import annotations

from typing import Any

from adapters.base import Adapter, StreamState
from adapters.errors import StateMismatchError
from tta_server.state.base import StreamRecord


def check_state_fits(
    incoming: StreamState,
    reference: StreamState,
    record: StreamRecord,
    adapter: Adapter[Any],
    sample_shape: tuple[int, ...],
) -> None:
    """Refuse a state made for another method, config, seed or model, or one the method could not have made.

    ``reference`` is the stream's source state; the method itself judges its tensors and
    metadata (:meth:`adapters.base.Adapter.check_state`: names, shapes, dtypes, bounded finite
    values, NaN only where it means "no value yet", a sane step, its own ``extra`` fields).
    """
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
    if meta.seed != record.seed:
        raise StateMismatchError(f"state was made with seed {meta.seed}, the stream uses seed {record.seed}")
    adapter.check_state(incoming, reference, sample_shape)
