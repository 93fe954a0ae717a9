"""Adapters registered by name. Registering a name twice is an error, raised at import."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

from adapters.base import Adapter
from adapters.errors import DuplicateMethodError, UnknownMethodError

_REGISTRY: dict[str, type[Adapter[Any]]] = {}

A = TypeVar("A", bound=type[Adapter[Any]])


def register(cls: A) -> A:
    """Class decorator: make ``cls`` available under ``cls.name``."""
    if cls.name in _REGISTRY:
        raise DuplicateMethodError(f"method name '{cls.name}' is already registered by {_REGISTRY[cls.name]!r}")
    _REGISTRY[cls.name] = cls
    return cls


def method_names() -> list[str]:
    """Registered method names in registration order."""
    return list(_REGISTRY)


def method_class(name: str) -> type[Adapter[Any]]:
    """The adapter class registered as ``name``."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownMethodError(f"unknown method '{name}'; available: {', '.join(_REGISTRY)}") from None


def create_adapter(name: str, config: Mapping[str, Any] | None = None) -> Adapter[Any]:
    """Instantiate the method ``name`` with a validated ``config``."""
    return method_class(name)(config)
