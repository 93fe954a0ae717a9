"""Run docker/haproxy/haproxy.cfg on loopback in front of local server processes (tests, benchmarks).

The proxy is configured only through the environment variables the config file reads, so the
tests run the very file that docker compose and the Kubernetes ConfigMap ship. Started and
stopped by pid; ``haproxy`` comes from the OS packages (``make proxy`` installs it where it can).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from tests.support.processes import free_port, wait_until_ready

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "docker" / "haproxy" / "haproxy.cfg"


def haproxy_binary() -> Path | None:
    """The haproxy binary on PATH (or Debian's /usr/sbin), or None."""
    found = shutil.which("haproxy") or (shutil.which("haproxy", path="/usr/sbin:/usr/local/sbin"))
    return Path(found) if found else None


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
        self.port, self.stats_port = free_port(), free_port()
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
        # ready once a replica answers /readyz through the proxy
        wait_until_ready(self.proc, f"{self.base}/readyz", seconds, f"haproxy on port {self.port}", self.log_tail, 0.1)

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
