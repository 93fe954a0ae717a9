"""A real Redis Cluster of ``redis-server`` processes on loopback, for the cluster tests.

Three masters with one replica each (six processes) on free ports in a temporary directory,
joined with ``redis-cli --cluster create ... --cluster-replicas 1 --cluster-yes``. Every process
is started by this module and stopped by its pid; nothing touches a Redis this module did not
start. A short ``cluster-node-timeout`` makes a failover after a killed master take about two
seconds, so a test of it stays short.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

NODE_TIMEOUT_MS = 1000
"""cluster-node-timeout: how long a silent master is waited for before its replica is promoted."""


def _free_port() -> int:
    """A TCP port with its cluster bus port (+10000) both free on 127.0.0.1 right now."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port: int = s.getsockname()[1]
        if port + 10000 > 65535:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as bus:
            try:
                bus.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair for a cluster node")


def cluster_binaries() -> tuple[Path, Path] | None:
    """``(redis-server, redis-cli)`` from PATH, or None when either is missing."""
    server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    return (Path(server), Path(cli)) if server and cli else None


@dataclass
class ClusterNode:
    """One ``redis-server`` process of the cluster."""

    port: int
    workdir: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2, socket_connect_timeout=2)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@dataclass
class LocalCluster:
    """Six cluster-enabled ``redis-server`` processes (3 masters + 3 replicas) under ``workdir``."""

    server: Path
    cli: Path
    workdir: Path
    size: int = 6
    nodes: list[ClusterNode] = field(default_factory=list)

    @property
    def url(self) -> str:
        """The store URL naming every node (any one of them is enough for discovery)."""
        return "redis+cluster://" + ",".join(node.address for node in self.nodes)

    def start(self, seconds: float = 30.0) -> None:
        """Start the processes, create the cluster and wait until every slot is served."""
        for _ in range(self.size):
            node = ClusterNode(_free_port(), self.workdir / f"node-{len(self.nodes)}")
            node.workdir.mkdir(parents=True, exist_ok=True)
            args = [str(self.server), "--bind", "127.0.0.1", "--port", str(node.port), "--dir", str(node.workdir)]
            args += ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]
            args += ["--cluster-node-timeout", str(NODE_TIMEOUT_MS), "--save", "", "--appendonly", "no"]
            args += ["--logfile", str(node.workdir / "redis.log")]
            node.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            self.nodes.append(node)
        deadline = time.monotonic() + seconds
        for node in self.nodes:
            while not _pings(node):
                if time.monotonic() > deadline or not node.alive():
                    raise RuntimeError(f"cluster node {node.address} did not start:\n{self.log_tail(node)}")
                time.sleep(0.05)
        create = [str(self.cli), "--cluster", "create", *(n.address for n in self.nodes)]
        create += ["--cluster-replicas", "1", "--cluster-yes"]
        done = subprocess.run(create, capture_output=True, text=True, timeout=seconds, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed:\n{done.stdout}\n{done.stderr}")
        self.wait_healthy(deadline - time.monotonic())

    def wait_healthy(self, seconds: float) -> None:
        """Until every live node reports ``cluster_state:ok``, every slot has a live master and every
        replica has finished its sync (a replica that never synced cannot be promoted)."""
        deadline = time.monotonic() + max(seconds, 1.0)
        while time.monotonic() < deadline:
            live = [node for node in self.nodes if node.alive()]
            if all(_state_ok(node) and _replica_synced(node) for node in live) and self._slots_covered():
                return
            time.sleep(0.1)
        raise RuntimeError("the Redis cluster did not become healthy in time")

    def _slots_covered(self) -> bool:
        live = {node.port for node in self.nodes if node.alive()}
        for node in self.nodes:
            if not node.alive():
                continue
            try:
                with node.client() as client:
                    ranges = client.execute_command("CLUSTER", "SLOTS")
            except redis.RedisError:
                return False
            covered = sum(int(r[1]) - int(r[0]) + 1 for r in ranges if int(r[2][1]) in live)
            return covered == 16384
        return False

    def master_of(self, key: str) -> ClusterNode:
        """The node that serves ``key``'s slot now."""
        for node in self.nodes:
            if not node.alive():
                continue
            with node.client() as client:
                slot = int(client.execute_command("CLUSTER", "KEYSLOT", key))
                for start, end, master, *_ in client.execute_command("CLUSTER", "SLOTS"):
                    if int(start) <= slot <= int(end):
                        port = int(master[1])
                        return next(n for n in self.nodes if n.port == port)
        raise RuntimeError(f"no live node serves {key!r}")

    def kill(self, node: ClusterNode) -> None:
        """SIGKILL one node (no shutdown, no goodbye to the cluster)."""
        if node.proc is not None and node.proc.poll() is None:
            os.kill(node.proc.pid, signal.SIGKILL)
            node.proc.wait(timeout=10)

    def stop(self) -> None:
        """Stop every process this cluster started, by pid."""
        for node in self.nodes:
            if node.proc is not None and node.proc.poll() is None:
                node.proc.terminate()
        for node in self.nodes:
            if node.proc is None:
                continue
            try:
                node.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                node.proc.kill()
                node.proc.wait(timeout=10)

    def log_tail(self, node: ClusterNode) -> str:
        log = node.workdir / "redis.log"
        return log.read_text(errors="replace")[-2000:] if log.exists() else ""


def _pings(node: ClusterNode) -> bool:
    try:
        with node.client() as client:
            return bool(client.ping())
    except redis.RedisError:
        return False


def _state_ok(node: ClusterNode) -> bool:
    try:
        with node.client() as client:
            info = client.execute_command("CLUSTER", "INFO")
    except redis.RedisError:
        return False
    text = info.decode() if isinstance(info, bytes) else str(info)
    return "cluster_state:ok" in text


def _replica_synced(node: ClusterNode) -> bool:
    """True for a master, or for a replica whose link to its master is up."""
    try:
        with node.client() as client:
            info = client.info("replication")
    except redis.RedisError:
        return False
    return bool(info.get("role") == "master" or info.get("master_link_status") == "up")
