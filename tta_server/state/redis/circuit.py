"""The circuit breaker of the Redis store: once Redis is unreachable, stop asking it.

Without a circuit every call would wait for socket timeouts while Redis is partitioned or hung
(a SIGSTOPped server accepts connections and never answers: with redis-py's one retry a call
costs twice the socket timeout). So the first call that fails with a connection error or a
timeout opens the circuit, and from then on the store answers from its hot cache or fails at
once with :class:`~tta_server.state.base.StoreUnavailableError`. Only the background prober
talks to Redis, at most once per ``probe_interval``, and a successful probe closes the circuit.
Errors where Redis *answered* (a script error, a refused command) say nothing about
reachability and leave the circuit closed.

The clock is injectable so the probe interval is testable without sleeping.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import redis

log = logging.getLogger(__name__)

OUTAGE_ERRORS: tuple[type[BaseException], ...] = (redis.ConnectionError, redis.TimeoutError)
"""Errors that mean "Redis did not answer" (refused, reset, timed out), as opposed to an error reply."""


class CircuitBreaker:
    """Open (Redis unreachable) or closed; thread-safe.

    ``where`` names the server in log lines (``host:port/db``, never credentials).
    """

    def __init__(
        self,
        where: str,
        probe_interval: float,
        clock: Callable[[], float] = time.monotonic,
        outage_errors: tuple[type[BaseException], ...] = OUTAGE_ERRORS,
    ) -> None:
        if probe_interval <= 0:
            raise ValueError(f"probe interval must be positive, got {probe_interval}")
        self.where = where
        self.probe_interval = probe_interval
        self._clock = clock
        self._outage_errors = outage_errors
        self._lock = threading.Lock()
        self._down_since: float | None = None
        self._last_probe = 0.0

    @property
    def is_open(self) -> bool:
        """True while Redis is considered unreachable (a call failed and no probe succeeded since)."""
        return self._down_since is not None

    @property
    def down_since(self) -> float | None:
        """Clock time at which the circuit opened, or None while it is closed."""
        return self._down_since

    def down_for(self) -> float:
        """Seconds the circuit has been open (0 while closed)."""
        since = self._down_since
        return 0.0 if since is None else max(0.0, self._clock() - since)

    def is_outage(self, exc: BaseException) -> bool:
        """True when ``exc`` means Redis did not answer (as opposed to answering with an error)."""
        return isinstance(exc, self._outage_errors)

    def record_failure(self, exc: BaseException) -> bool:
        """Open the circuit if ``exc`` is an outage error; True when it is one.

        The first probe is due one interval after opening: the call that just failed was the probe.
        """
        if not self.is_outage(exc):
            return False
        with self._lock:
            if self._down_since is None:
                self._down_since = self._last_probe = self._clock()
                log.warning("Redis at %s unreachable (%s): serving from the hot cache", self.where, exc)
        return True

    def record_success(self) -> float | None:
        """Close the circuit; returns for how many seconds it had been open, or None if it was closed."""
        with self._lock:
            since, self._down_since = self._down_since, None
        return None if since is None else max(0.0, self._clock() - since)

    def probe_due(self, force: bool = False) -> bool:
        """True when the circuit is open and a probe is due (always when ``force``).

        Claims the probe: the probe time is recorded at once, so concurrent callers do not
        all probe a hung server.
        """
        with self._lock:
            if self._down_since is None:
                return False
            now = self._clock()
            if not force and now - self._last_probe < self.probe_interval:
                return False
            self._last_probe = now
            return True
