"""When the Redis store writes a stream's state: at every step, or every N steps / T seconds.

Write-through (the default) persists every adaptation step before the prediction is
answered, so a crash loses nothing that was acknowledged and several replicas may serve one
stream (compare-and-set with reload and retry). Write-behind keeps the newest state in the
process's hot cache and persists it after ``every_steps`` unpersisted steps or once the
oldest unpersisted step is ``every_seconds`` old, whichever comes first, and on graceful
shutdown. A crash (SIGKILL, OOM kill, power loss) loses the unpersisted steps, and it is
only safe when exactly one replica serves a stream: a second replica would adapt from the
older persisted state and one of the two histories is discarded at the next flush.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class WriteMode(StrEnum):
    """``write-through`` persists each step; ``write-behind`` batches steps in the hot cache."""

    WRITE_THROUGH = "write-through"
    WRITE_BEHIND = "write-behind"


@dataclass(frozen=True)
class WritePolicy:
    """The write policy of one store; ``due`` decides whether pending steps must be written now."""

    mode: WriteMode = WriteMode.WRITE_THROUGH
    every_steps: int = 10
    every_seconds: float = 5.0

    def __post_init__(self) -> None:
        if self.every_steps < 1:
            raise ValueError(f"write-behind every_steps must be >= 1, got {self.every_steps}")
        if self.every_seconds <= 0:
            raise ValueError(f"write-behind every_seconds must be > 0, got {self.every_seconds}")

    @property
    def write_through(self) -> bool:
        return self.mode is WriteMode.WRITE_THROUGH

    def due(self, pending_steps: int, dirty_since: float | None, now: float) -> bool:
        """True when ``pending_steps`` unpersisted steps, the oldest from ``dirty_since``, must be written."""
        if pending_steps <= 0:
            return False
        if self.write_through:
            return True
        if pending_steps >= self.every_steps:
            return True
        return dirty_since is not None and now - dirty_since >= self.every_seconds
