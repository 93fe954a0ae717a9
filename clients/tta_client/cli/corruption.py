"""Optional benchmark corruptions, borrowed from the server package when it is installed.

The client must install without torch, so it never depends on ``tta_server``; when the
server package happens to be importable (a developer checkout, the server image), replay
can corrupt images with the same seeded CIFAR-10-C functions the benchmarks use, so that
a replay reproduces a benchmark domain exactly. Otherwise the caller is told why and
replays the images as they are.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

MODULE = "tta_server.shift.corruptions"

CorruptFn = Callable[[npt.NDArray[np.uint8], str, int, int], npt.NDArray[np.uint8]]


@dataclass(frozen=True)
class Corruptions:
    """The server's corruption function with the names and severities it accepts."""

    corrupt: CorruptFn
    names: tuple[str, ...]
    severities: tuple[int, ...]

    def check(self, name: str, severity: int) -> None:
        if name not in self.names:
            raise ValueError(f"unknown corruption '{name}'; available: {', '.join(self.names)}")
        if severity not in self.severities:
            raise ValueError(f"severity must be one of {self.severities}, got {severity}")


def load_corruptions() -> Corruptions | str:
    """The corruption functions, or the reason they cannot be used (a sentence for the user)."""
    try:
        module = importlib.import_module(MODULE)
    except ImportError as exc:
        return (
            f"corruptions need the tta-server package ({MODULE} is not importable: {exc}); "
            "install tta-server beside tta-client, or pre-corrupt the images"
        )
    try:
        return Corruptions(module.corrupt, tuple(module.CORRUPTIONS), tuple(module.SEVERITIES))
    except AttributeError as exc:
        return f"{MODULE} does not offer corrupt/CORRUPTIONS/SEVERITIES ({exc}); this tta-server is too old or too new"
