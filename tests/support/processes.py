"""Helpers for tests and benchmarks that run servers as subprocesses on loopback ports.

One free-port finder and one readiness wait, so the integration fixtures, the proxy helper and
the scale-out benchmark all fail the same clear way when a process dies or never answers.
"""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Callable

import httpx


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_until_ready(
    proc: subprocess.Popen[bytes],
    url: str,
    seconds: float,
    what: str,
    log_tail: Callable[[], str] = lambda: "",
    interval: float = 0.2,
) -> None:
    """Return once ``url`` answers 200; raise with ``what`` and the log tail if ``proc`` exits or time runs out."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}:\n{log_tail()}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(interval)
    raise RuntimeError(f"{what} not ready after {seconds}s:\n{log_tail()}")
