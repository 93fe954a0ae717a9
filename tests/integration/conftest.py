"""Fixtures of the Redis store tests: a unique key prefix per test, throw-away Redis servers, server processes.

Everything runs against real redis-server processes (never a fake): the shared one at
``redis_url_for_tests()`` with a unique prefix that is deleted afterwards, or a private one
on a free port for tests that stop and restart Redis.
"""

from __future__ import annotations

import os
import signal
import subprocess
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import redis

from tests.api.helpers import npy_bytes, random_images
from tests.support.processes import free_port, wait_until_ready
from tests.support.redis_server import find_server_binary, redis_url_for_tests, start_server, wait_until_answers

REPO = Path(__file__).resolve().parents[2]
SERVER_BIN = REPO / ".venv" / "bin" / "tta-server"
NPY = {"content-type": "application/x-npy"}


def delete_prefix(url: str, prefix: str) -> None:
    """Delete every key under ``prefix`` (bounded SCAN)."""
    client = redis.Redis.from_url(url)
    try:
        batch = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        if batch:
            client.delete(*batch)
    finally:
        client.close()


@pytest.fixture
def redis_url() -> str:
    url = redis_url_for_tests()
    client = redis.Redis.from_url(url, socket_connect_timeout=1)
    try:
        client.ping()
    except redis.RedisError as exc:
        pytest.fail(f"no Redis answers at {url} ({exc}): run `make redis`")
    finally:
        client.close()
    return url


@pytest.fixture
def prefix(redis_url: str) -> Iterator[str]:
    """A key prefix no other test uses; its keys are deleted after the test."""
    name = f"tta-test-{uuid.uuid4().hex[:12]}"
    yield name
    delete_prefix(redis_url, name)


@dataclass
class PrivateRedis:
    """A redis-server of this test only, on a free port, that the test may stop and restart."""

    binary: Path
    workdir: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = start_server(self.binary, self.port, self.workdir, daemonize=False)
        if not wait_until_answers(self.url, seconds=10):
            raise RuntimeError(f"redis-server did not answer on port {self.port}")

    def stop(self, save: bool = False) -> None:
        """Stop the server; ``save`` writes an RDB first so a restart keeps the data."""
        if self.proc is None:
            return
        if save:
            client = redis.Redis.from_url(self.url)
            try:
                client.shutdown(save=True)
            except redis.ConnectionError:
                pass
            finally:
                client.close()
        else:
            self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    binary = find_server_binary(install=False)
    if binary is None:
        pytest.fail("no redis-server binary found: install redis-server (or run `make redis`)")
    server = PrivateRedis(binary, tmp_path / "redis")
    server.start()
    yield server
    server.stop()


@dataclass
class ServerProcess:
    """One ``tta-server serve`` subprocess on 127.0.0.1."""

    port: int
    proc: subprocess.Popen[bytes]
    log_path: Path

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, timeout: float = 30.0) -> httpx.Client:
        return httpx.Client(base_url=self.base, timeout=timeout)

    def wait_ready(self, seconds: float = 90.0) -> None:
        wait_until_ready(self.proc, f"{self.base}/readyz", seconds, f"server on port {self.port}", self.log_tail)

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:] if self.log_path.exists() else ""

    def kill(self, sig: signal.Signals = signal.SIGKILL, wait: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=wait)


@pytest.fixture
def launch(tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    """Start ``tta-server serve`` subprocesses (not yet waited for); all are killed at teardown."""
    started: list[ServerProcess] = []

    command = [str(SERVER_BIN), "serve", "--models-dir", str(REPO.parent / "shared" / "models")]
    command += ["--device", "cpu", "--log-level", "warning"]

    def start(store_url: str, prefix: str, **env: str) -> ServerProcess:
        port = free_port()
        log_path = tmp_path / f"server-{port}.log"
        environment = {
            **os.environ,
            "TTA_REDIS_KEY_PREFIX": prefix,
            "TTA_DRIFT_SAMPLE_EVERY": "0",
            "TTA_MAX_DELAY_MS": "0",
            "OMP_NUM_THREADS": "1",  # two servers share two cores in these tests
            **env,
        }
        with log_path.open("wb") as log_file:
            proc = subprocess.Popen(
                [*command, "--port", str(port), "--store", store_url],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=environment,
                cwd=REPO,
            )
        server = ServerProcess(port, proc, log_path)
        started.append(server)
        return server

    yield start
    for server in started:
        if server.proc.poll() is None:
            server.kill(signal.SIGKILL)


def predict(client: httpx.Client, stream_id: str, n: int = 2, seed: int = 0) -> httpx.Response:
    """POST one small .npy batch to a stream."""
    body = npy_bytes(random_images(n, seed=seed))
    return client.post(f"/v1/streams/{stream_id}/predict", content=body, headers=NPY)
