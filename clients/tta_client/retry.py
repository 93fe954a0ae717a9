"""When and how long to wait before sending a request again.

Only answers that mean "the server did not run this, try later" are retried: 429
(queue_full: refused before it was queued) and 503 (not ready, or the state store
unreachable), plus connection failures where the request never reached a server
(:class:`~tta_client.errors.ConnectFailed`). A read timeout is *not* retried by default:
the server may have run the request, and a predict with ``adapt=true`` that ran twice would
update the stream twice.

The wait is the server's ``Retry-After`` when it sends one (it knows its queue), else
exponential backoff with full jitter, so that many clients refused together do not
return together. Attempts are bounded, and so is any single wait.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from tta_client.errors import ClientTimeout, ConnectFailed, ServiceUnavailable, TransportError, TTAClientError


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded retries with exponential backoff that honour ``Retry-After``.

    ``max_attempts`` counts every try, the first included (1 = never retry). The n-th wait
    (n = 1, 2, ...) is ``Retry-After`` if the server sent one, else a random value in
    ``[0, min(max_backoff, backoff * 2**(n-1))]``; either way at most ``max_wait``.
    """

    max_attempts: int = 4
    backoff: float = 0.25
    max_backoff: float = 8.0
    max_wait: float = 30.0
    statuses: frozenset[int] = field(default_factory=lambda: frozenset({429, 503}))
    retry_connect_errors: bool = True
    retry_timeouts: bool = False
    jitter: bool = True

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if self.backoff < 0 or self.max_backoff < 0 or self.max_wait < 0:
            raise ValueError("backoff, max_backoff and max_wait must not be negative")

    @classmethod
    def never(cls) -> RetryPolicy:
        """No retries: every error surfaces at once (load tests count 429s this way)."""
        return cls(max_attempts=1)

    def should_retry(self, error: TTAClientError, attempt: int) -> bool:
        """Whether ``error`` from try number ``attempt`` (1-based) deserves another try."""
        if attempt >= self.max_attempts:
            return False
        if isinstance(error, ConnectFailed):
            return self.retry_connect_errors
        if isinstance(error, ClientTimeout):
            return self.retry_timeouts
        if isinstance(error, TransportError):
            return False
        return error.status in self.statuses or (isinstance(error, ServiceUnavailable) and 503 in self.statuses)

    def wait(self, error: TTAClientError, attempt: int, rng: random.Random | None = None) -> float:
        """Seconds to sleep after try number ``attempt`` failed with ``error``."""
        if error.retry_after is not None:
            return min(self.max_wait, error.retry_after)
        ceiling = min(self.max_backoff, self.backoff * 2 ** (attempt - 1))
        delay = (rng or random).uniform(0, ceiling) if self.jitter else ceiling
        return min(self.max_wait, delay)
