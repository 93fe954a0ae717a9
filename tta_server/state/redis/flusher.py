"""The background thread of the Redis store: probe, catch up, flush write-behind steps, count.

One thread per store does all the Redis work that no request should wait for:

- while the circuit is open, probe Redis once per probe interval (the only Redis call then);
- when steps are due (write-behind N steps / T seconds, or pending since an outage), write them;
- every ``count_interval`` seconds, read the number of registered streams, so that ``count()``
  (a gauge read at every scrape) answers from memory.

It wakes every ``tick`` seconds, or at once when :meth:`Flusher.wake` is called (Redis came
back). A failing step is logged and the loop survives: the next tick tries again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Protocol

log = logging.getLogger(__name__)


class FlushTarget(Protocol):
    """What the flusher drives (the Redis store)."""

    def flush_due(self, force: bool) -> int:
        """Probe Redis if the circuit is open and a probe is due, then write due states; returns states pending."""

    def refresh_count(self) -> None:
        """Read the number of registered streams (a no-op while the circuit is open)."""


class Flusher:
    """A daemon thread running ``target``'s background work until :meth:`stop`."""

    def __init__(
        self,
        target: FlushTarget,
        tick: float,
        count_interval: float,
        clock: Callable[[], float] = time.monotonic,
        name: str = "redis-state-flusher",
    ) -> None:
        self.target = target
        self.tick = tick
        self.count_interval = count_interval
        self._clock = clock
        self._next_count = 0.0
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        """Run the next round now instead of at the next tick."""
        self._wake.set()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the loop and wait for the round in progress (at most ``timeout`` seconds)."""
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=timeout)

    def run_once(self) -> None:
        """One round: flush (probing first while Redis is down), then refresh the count when it is due."""
        try:
            self.target.flush_due(force=False)
        except Exception:
            log.exception("Redis state flusher failed; retrying")
        now = self._clock()
        if now >= self._next_count:
            self._next_count = now + self.count_interval
            try:
                self.target.refresh_count()
            except Exception:
                log.exception("reading the Redis stream count failed; retrying")

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.run_once()
            self._wake.wait(self.tick)
            self._wake.clear()
