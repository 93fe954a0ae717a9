"""StreamState <-> bytes with safetensors: tensors plus the metadata strings, never pickle.

The state's metadata (:meth:`StateMeta.to_strings`) goes into the safetensors header's
``__metadata__``; ``safetensors.torch.load`` returns tensors only, so the header is parsed here
(8-byte little-endian length, then JSON), which is the documented safetensors format.
"""

from __future__ import annotations

import json
import struct

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from adapters.base import StateMeta, StreamState
from adapters.errors import StateMismatchError

_HEADER_LEN = 8
_MAX_HEADER = 100 * 1024 * 1024
_META_FIELDS = frozenset({"method", "config", "model_hash", "seed", "step", "version"})


def state_to_bytes(state: StreamState) -> bytes:
    """Serialize a state: CPU, contiguous copies of its tensors and its metadata strings."""
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.tensors.items()}
    return save(tensors, metadata=state.meta.to_strings())


def _header(data: bytes) -> dict[str, object]:
    """The safetensors header as a JSON object (8-byte little-endian length, then JSON)."""
    if len(data) < _HEADER_LEN:
        raise StateMismatchError(f"malformed state bytes: {len(data)} bytes, shorter than the header length field")
    (header_len,) = struct.unpack("<Q", data[:_HEADER_LEN])
    if header_len > min(len(data) - _HEADER_LEN, _MAX_HEADER):
        raise StateMismatchError(f"malformed state bytes: header of {header_len} bytes does not fit the body")
    try:
        header = json.loads(data[_HEADER_LEN : _HEADER_LEN + header_len])
    except (UnicodeDecodeError, ValueError):
        raise StateMismatchError("malformed state bytes: the header is not JSON") from None
    if not isinstance(header, dict):
        raise StateMismatchError("malformed state bytes: the header is not a JSON object")
    return header


def _metadata(header: dict[str, object]) -> StateMeta:
    """The state's metadata from the header's ``__metadata__`` strings, with the field that is wrong named."""
    raw = header.get("__metadata__") or {}
    if not isinstance(raw, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in raw.items()):
        raise StateMismatchError("malformed state metadata: '__metadata__' must map strings to strings")
    missing = sorted(_META_FIELDS - set(raw))
    unknown = sorted(set(raw) - _META_FIELDS - {"extra"})
    if missing or unknown:
        raise StateMismatchError(f"malformed state metadata: missing {missing}, unknown {unknown[:5]}")
    for field in ("seed", "step", "version"):
        if not raw[field].lstrip("-").isdigit() or len(raw[field]) > 20:
            raise StateMismatchError(f"malformed state metadata: '{field}' must be an integer, got {raw[field][:40]!r}")
    try:
        meta = StateMeta.from_strings(raw)
    except ValueError as exc:
        raise StateMismatchError(f"malformed state metadata: {exc}") from None
    if not isinstance(meta.config, dict):
        raise StateMismatchError("malformed state metadata: 'config' must be a JSON object")
    if not isinstance(meta.extra, dict):
        raise StateMismatchError("malformed state metadata: 'extra' must be a JSON object")
    return meta


def state_from_bytes(data: bytes, device: torch.device | str | None = None) -> StreamState:
    """Inverse of :func:`state_to_bytes`; raises :class:`StateMismatchError` naming what is malformed."""
    meta = _metadata(_header(data))
    try:
        tensors = load(data)
    except SafetensorError as exc:
        raise StateMismatchError(f"malformed state bytes: {exc}") from None
    if device is not None:
        tensors = {k: v.to(device) for k, v in tensors.items()}
    return StreamState(dict(tensors), meta)
