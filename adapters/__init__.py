"""Test-time adaptation methods as per-stream adapters (pure torch + pydantic).

Importing this package registers every built-in method; see :mod:`adapters.base` for the
contract and :mod:`adapters.registry` for lookup by name.
"""

from adapters import adab2n, alpha_bn, auto, bn, cema, sar, source, tent, unmix_tns  # registers the built-in methods
from adapters.base import Adapter, MethodConfig, Segment, StateMeta, StepInfo, StepResult, StreamState
from adapters.registry import create_adapter, method_class, method_names, register

__all__ = [
    "Adapter",
    "MethodConfig",
    "Segment",
    "StateMeta",
    "StepInfo",
    "StepResult",
    "StreamState",
    "adab2n",
    "alpha_bn",
    "auto",
    "bn",
    "cema",
    "create_adapter",
    "method_class",
    "method_names",
    "register",
    "sar",
    "source",
    "tent",
    "unmix_tns",
]
