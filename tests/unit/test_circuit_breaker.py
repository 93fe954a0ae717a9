"""The Redis store's circuit breaker with a fake clock: which errors open it, the probe interval, closing."""

from __future__ import annotations

import pytest
import redis

from tta_server.state.redis.circuit import CircuitBreaker


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def position(circuit: CircuitBreaker) -> str:
    """``open`` or ``closed`` (a function, so the type checker does not pin the property between calls)."""
    return "open" if circuit.is_open else "closed"


def test_outage_errors_open_it_and_error_replies_do_not() -> None:
    circuit = CircuitBreaker("h:1/0", probe_interval=1.0, clock=FakeClock())
    assert position(circuit) == "closed" and circuit.down_since is None and circuit.down_for() == 0.0
    assert not circuit.record_failure(redis.ResponseError("NOSCRIPT"))  # Redis answered
    assert not circuit.record_failure(ValueError("not a Redis error"))
    assert position(circuit) == "closed"
    assert circuit.record_failure(redis.TimeoutError("Timeout reading from socket"))  # hung server (SIGSTOP)
    assert position(circuit) == "open"
    other = CircuitBreaker("h:1/0", probe_interval=1.0, clock=FakeClock())
    assert other.record_failure(redis.ConnectionError("Connection refused")) and other.is_open


def test_probe_interval_and_close_on_success() -> None:
    clock = FakeClock()
    circuit = CircuitBreaker("h:1/0", probe_interval=2.0, clock=clock)
    assert not circuit.probe_due() and not circuit.probe_due(force=True)  # closed: nothing to probe
    circuit.record_failure(redis.ConnectionError())
    assert circuit.down_since == 100.0
    assert not circuit.probe_due()  # the failed call was the first probe
    clock.now = 101.9
    assert not circuit.probe_due() and circuit.down_for() == pytest.approx(1.9)
    assert circuit.probe_due(force=True)  # shutdown flush: probe now, and that counts as a probe
    clock.now = 103.0
    assert not circuit.probe_due()
    clock.now = 103.9
    assert circuit.probe_due()
    assert not circuit.probe_due()  # claimed: a second caller does not probe a hung server again
    circuit.record_failure(redis.TimeoutError())  # still down: keeps the original opening time
    assert circuit.down_since == 100.0
    clock.now = 105.0
    assert circuit.record_success() == pytest.approx(5.0)
    assert position(circuit) == "closed" and circuit.down_for() == 0.0
    assert circuit.record_success() is None  # already closed
    with pytest.raises(ValueError, match="probe interval"):
        CircuitBreaker("h:1/0", probe_interval=0)
