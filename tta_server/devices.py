"""Device choices and the one function that turns a choice into a torch device.

Torch-free at import, because the settings (and so ``tta-server --help``) import it.
"""

from __future__ import annotations

from enum import StrEnum


class DeviceChoice(StrEnum):
    """Where models run: ``auto`` picks CUDA when available, else CPU."""

    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"


class DeviceError(ValueError):
    """A device that this machine does not have, or a name that is not a device choice."""


def resolve_device(choice: DeviceChoice | str) -> str:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``; ``cuda`` without a GPU is an error.

    The one place that turns a device choice into a torch device, for the server and ``eval`` alike.
    """
    try:
        choice = DeviceChoice(choice)
    except ValueError:
        raise DeviceError(f"unknown device {choice!r}; choose auto, cpu or cuda") from None
    import torch  # here, so that reading settings (``--help``) does not load torch

    if choice is DeviceChoice.CUDA and not torch.cuda.is_available():
        raise DeviceError("device 'cuda' was requested but no CUDA device is available")
    if choice is DeviceChoice.AUTO:
        return "cuda" if torch.cuda.is_available() else "cpu"
    return choice.value
