"""Run docker/haproxy/haproxy.cfg on loopback in front of local server processes (tests, benchmarks).

The proxy is configured only through the environment variables the config file reads, so the
tests run the very file that docker compose and the Kubernetes ConfigMap ship. Started and
stopped by pid; ``haproxy`` comes from the OS packages (``make proxy`` installs it where it can).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "docker" / "haproxy" / "haproxy.cfg"


def haproxy_binary() -> Path | None:
    """The haproxy binary on PATH (or Debian's /usr/sbin), or None."""
    found = shutil.which("haproxy") or (shutil.which("haproxy", path="/usr/sbin:/usr/local/sbin"))
    return Path(found) if found else None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Proxy:
    """One haproxy process routing to ``replicas`` (``host:port`` each, exactly three)."""

    binary: Path
    replicas: list[str]
    log_path: Path
    random: bool = False
    port: int = 0
    stats_port: int = 0
    proc: subprocess.Popen[bytes] | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, seconds: float = 15.0) -> None:
        """Start haproxy and wait until it routes a request to a ready replica."""
        if len(self.replicas) != 3:
            raise ValueError("the config names three static replicas (TTA_REPLICA_1..3)")
        self.port, self.stats_port = _free_port(), _free_port()
        env = {
            **os.environ,
            "TTA_PROXY_BIND": f"127.0.0.1:{self.port}",
            "TTA_PROXY_STATS_BIND": f"127.0.0.1:{self.stats_port}",
            **{f"TTA_REPLICA_{i + 1}": address for i, address in enumerate(self.replicas)},
        }
        if self.random:
            env["TTA_PROXY_RANDOM"] = "1"
        else:
            env.pop("TTA_PROXY_RANDOM", None)
        env.pop("TTA_DNS_SERVICE", None)
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [str(self.binary), "-db", "-f", str(CONFIG)], stdout=log, stderr=subprocess.STDOUT, env=env
            )
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"haproxy exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.base}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"haproxy on port {self.port} routes nothing after {seconds}s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:] if self.log_path.exists() else ""
