"""StreamState <-> bytes with safetensors: tensors plus the metadata strings, never pickle.

The state's metadata (:meth:`StateMeta.to_strings`) goes into the safetensors header's
``__metadata__``; ``safetensors.torch.load`` returns tensors only, so the header is parsed here
(8-byte little-endian length, then JSON), which is the documented safetensors format.
"""

from __future__ import annotations

import json
import struct

import torch
from safetensors.torch import load, save

from adapters.base import StateMeta, StreamState
from adapters.errors import StateMismatchError

_HEADER_LEN = 8


def state_to_bytes(state: StreamState) -> bytes:
    """Serialize a state: CPU, contiguous copies of its tensors and its metadata strings."""
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.tensors.items()}
    return save(tensors, metadata=state.meta.to_strings())


def state_from_bytes(data: bytes, device: torch.device | str | None = None) -> StreamState:
    """Inverse of :func:`state_to_bytes`; raises :class:`StateMismatchError` on malformed bytes."""
    try:
        (header_len,) = struct.unpack("<Q", data[:_HEADER_LEN])
        header = json.loads(data[_HEADER_LEN : _HEADER_LEN + header_len])
        meta = StateMeta.from_strings(header.get("__metadata__") or {})
        tensors = load(data)
    except (struct.error, ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise StateMismatchError(f"malformed state bytes: {exc}") from exc
    if device is not None:
        tensors = {k: v.to(device) for k, v in tensors.items()}
    return StreamState(dict(tensors), meta)
