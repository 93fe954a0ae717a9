"""Errors raised by adapters; the server maps each to one HTTP status in one place."""

from __future__ import annotations

from pydantic import ValidationError


class AdapterError(Exception):
    """Base of every adapter error."""


class UnknownMethodError(AdapterError, KeyError):
    """No adapter is registered under this name (HTTP 422)."""


class DuplicateMethodError(AdapterError):
    """Two adapters tried to register the same name (a programming error, raised at import)."""


class InvalidConfigError(AdapterError, ValueError):
    """A method config failed validation (HTTP 422); ``errors`` holds pydantic's details."""

    def __init__(self, method: str, exc: ValidationError) -> None:
        self.method = method
        self.errors = exc.errors(include_url=False)
        fields = ", ".join(".".join(str(p) for p in e["loc"]) + f": {e['msg']}" for e in self.errors)
        super().__init__(f"invalid config for method '{method}': {fields}")


class UnsupportedModelError(AdapterError, ValueError):
    """The method cannot adapt this model, e.g. its norm type (HTTP 422 at stream registration)."""


class AuxiliaryModelError(UnsupportedModelError):
    """An auxiliary model a method needs (e.g. CEMA's teacher) is missing or unusable (HTTP 422)."""


class StateMismatchError(AdapterError, ValueError):
    """A state does not fit the method, config or model it is used with (HTTP 422 on import)."""
