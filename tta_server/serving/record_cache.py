"""Values derived from a stream registration, remembered per registration object.

Why: the in-memory store hands out the same :class:`StreamRecord` object for a stream on every
request, and deriving a value from it (the method setup, the fusion group) starts with a
``json.dumps`` of its config, once per request. Remembered by the object's identity (a
registration read again from Redis is a new object and is derived again, as is a changed one),
holding the object itself so that its id cannot be reused while remembered, and bounded.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from tta_server.state.base import StreamRecord

V = TypeVar("V")


class RecordCache(Generic[V]):
    """``derive(record)``, computed once per registration object (at most ``size`` remembered)."""

    def __init__(self, derive: Callable[[StreamRecord], V], size: int = 4096) -> None:
        self._derive = derive
        self._size = size
        self._by_id: dict[int, tuple[StreamRecord, V]] = {}

    def __call__(self, record: StreamRecord) -> V:
        remembered = self._by_id.get(id(record))
        if remembered is not None and remembered[0] is record:
            return remembered[1]
        value = self._derive(record)
        if len(self._by_id) >= self._size:
            self._by_id.clear()
        self._by_id[id(record)] = (record, value)
        return value
