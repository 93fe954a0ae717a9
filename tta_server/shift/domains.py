"""Names of the test domains: the 15 CIFAR-10-C corruptions, the severities, and clean images.

Kept apart from the corruption code (which loads SciPy, torch and the frost textures) so that
stream planning and the command line can name domains without importing any of it.
"""

from __future__ import annotations

from dataclasses import dataclass

CORRUPTIONS: tuple[str, ...] = (
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "defocus_blur",
    "glass_blur",
    "motion_blur",
    "zoom_blur",
    "snow",
    "frost",
    "fog",
    "brightness",
    "contrast",
    "elastic_transform",
    "pixelate",
    "jpeg_compression",
)
"""CIFAR-10-C's corruptions in the protocol's order (the order of the ``continual`` stream)."""

CLEAN = "none"
"""The name of the uncorrupted domain (``--corruptions none`` or ``--severity 0``)."""

SEVERITIES: tuple[int, ...] = (1, 2, 3, 4, 5)


class CorruptionError(ValueError):
    """An unknown corruption name, a severity outside 1-5, or images that are not uint8 NxHxWx3."""


@dataclass(frozen=True, order=True)
class Domain:
    """One test domain: a corruption at a severity, or the clean images (``none`` at severity 0)."""

    corruption: str
    severity: int

    @property
    def is_clean(self) -> bool:
        return self.corruption == CLEAN

    @property
    def name(self) -> str:
        """``gaussian_noise-5``, or ``none`` for clean images."""
        return CLEAN if self.is_clean else f"{self.corruption}-{self.severity}"

    @classmethod
    def clean(cls) -> Domain:
        return cls(CLEAN, 0)

    def check(self) -> None:
        """Raise :class:`CorruptionError` unless this is clean or a known corruption at 1-5."""
        if not self.is_clean:
            check_corruption(self.corruption, self.severity)
        elif self.severity != 0:
            raise CorruptionError(f"clean images ('{CLEAN}') have severity 0, got {self.severity}")


def check_corruption(corruption: str, severity: int) -> None:
    """Raise :class:`CorruptionError` for an unknown name or a severity outside 1-5."""
    if corruption not in CORRUPTIONS:
        raise CorruptionError(f"unknown corruption '{corruption}'; available: {', '.join(CORRUPTIONS)}")
    if severity not in SEVERITIES:
        raise CorruptionError(f"severity must be one of {SEVERITIES}, got {severity}")
