"""A three-master Redis Cluster and a Redis Sentinel group, each on free loopback ports.

Every process is a `redis-server` child in its own temporary directory: the cluster
nodes run with `--cluster-enabled yes`, the sentinels with `--sentinel` and a
generated sentinel.conf. The fixtures fail, and never skip, when a binary is missing
or a server does not come up in time.
"""

import secrets
import signal
import subprocess
import time
from pathlib import Path

import pytest
import redis
from redis.cluster import RedisCluster

from supervisor.embedded import find_redis_server
from tests.fixtures_redis import free_port, have_redis_cli
from tests.harness import SupervisorProcess, wait_for

START_TIMEOUT_SECONDS = 10.0
# Seconds for `redis-cli --cluster create` and for every node to report cluster_state:ok.
CLUSTER_FORM_TIMEOUT_SECONDS = 30.0
SENTINEL_MASTER_NAME = "taskvisor-test"
# A master that does not respond for this long is down in a sentinel's view. Low values
# make a failover take a few seconds.
SENTINEL_DOWN_AFTER_MS = 1000
SENTINEL_FAILOVER_TIMEOUT_MS = 4000


class ServerProcess:
    """One redis-server child process (a data node or a sentinel) on a loopback port."""

    def __init__(self, binary: str, data_dir: Path, arguments: list[str], port: int | None = None) -> None:
        self.binary = binary
        self.data_dir = data_dir
        self.port = port or free_port()
        self.arguments = arguments
        self.process: subprocess.Popen | None = None

    def client(self) -> redis.Redis:
        """A plain client for this one process. A cluster node replies MOVED to commands on other nodes' keys."""
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=10)

    def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.data_dir / "redis.log"
        self.process = subprocess.Popen(
            [self.binary, *self.arguments, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.data_dir),
             "--logfile", str(log_path)],
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
        probe = self.client()
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while True:
            try:
                probe.ping()
                return
            except redis.ConnectionError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    text = log_path.read_text(errors="replace")[-2000:] if log_path.exists() else "(no log)"
                    raise RuntimeError(f"{self.binary} on port {self.port} did not start:\n{text}") from None
                time.sleep(0.02)

    def kill(self) -> None:
        """Stop the process at once with SIGKILL, as a crash would."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


def _data_node_arguments() -> list[str]:
    # A replica's first sync would otherwise wait 5 s for more replicas to join it.
    return ["--save", "", "--appendonly", "no", "--repl-diskless-sync-delay", "0"]


class ClusterGroup:
    """Three cluster nodes, each a master of a third of the 16384 slots, with no replicas."""

    def __init__(self, binary: str, base_dir: Path) -> None:
        self.nodes = []
        for index in range(3):
            arguments = [
                *_data_node_arguments(), "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                "--cluster-port", str(free_port()), "--cluster-node-timeout", "2000",
            ]  # fmt: skip
            self.nodes.append(ServerProcess(binary, base_dir / f"node-{index}", arguments))

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{node.port}" for node in self.nodes)

    def client(self) -> RedisCluster:
        return RedisCluster(host="127.0.0.1", port=self.nodes[0].port, socket_timeout=10)

    def start(self) -> None:
        for node in self.nodes:
            node.start()
        addresses = [f"127.0.0.1:{node.port}" for node in self.nodes]
        created = subprocess.run(
            [have_redis_cli(), "--cluster", "create", *addresses, "--cluster-replicas", "0", "--cluster-yes"],
            check=False, capture_output=True, text=True, timeout=CLUSTER_FORM_TIMEOUT_SECONDS,
        )  # fmt: skip
        assert created.returncode == 0, f"redis-cli --cluster create failed:\n{created.stdout}\n{created.stderr}"
        wait_for(self._formed, CLUSTER_FORM_TIMEOUT_SECONDS, "cluster_state:ok on every node", interval=0.1)

    def _formed(self) -> bool:
        for node in self.nodes:
            info = node.client().cluster("info")
            if info.get("cluster_state") != "ok" or int(info.get("cluster_known_nodes", 0)) != len(self.nodes):
                return False
        return True

    def node_holding(self, key: str) -> ServerProcess:
        """Return the node whose own keyspace contains `key`, asked of each node directly."""
        holders = [node for node in self.nodes if key.encode() in set(node.client().scan_iter(match=key, count=1000))]
        assert len(holders) == 1, f"{key} is on {len(holders)} nodes, expected exactly one"
        return holders[0]

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


class SentinelGroup:
    """A master, one replica of it, and three sentinels that watch the master with quorum 2."""

    def __init__(self, binary: str, base_dir: Path) -> None:
        self.binary = binary
        self.base_dir = base_dir
        self.master = ServerProcess(binary, base_dir / "master", _data_node_arguments())
        replica_arguments = [*_data_node_arguments(), "--replicaof", "127.0.0.1", str(self.master.port)]
        self.replica = ServerProcess(binary, base_dir / "replica", replica_arguments)
        self.sentinel_ids = [secrets.token_hex(20) for _ in range(3)]
        self.sentinels = [ServerProcess(binary, base_dir / f"sentinel-{index}", []) for index in range(3)]

    @property
    def url(self) -> str:
        addresses = ",".join(f"127.0.0.1:{sentinel.port}" for sentinel in self.sentinels)
        return f"redis+sentinel://{addresses}/{SENTINEL_MASTER_NAME}/0"

    def write_sentinel_config(self, index: int) -> Path:
        """Write a sentinel.conf that already lists the replica and the other sentinels.

        Without the `known-*` lines a sentinel learns them from INFO and hello messages,
        which takes up to ten seconds.
        """
        directory = self.sentinels[index].data_dir
        directory.mkdir(parents=True, exist_ok=True)
        name = SENTINEL_MASTER_NAME
        lines = [
            f"sentinel myid {self.sentinel_ids[index]}",
            f"sentinel monitor {name} 127.0.0.1 {self.master.port} 2",
            f"sentinel down-after-milliseconds {name} {SENTINEL_DOWN_AFTER_MS}",
            f"sentinel failover-timeout {name} {SENTINEL_FAILOVER_TIMEOUT_MS}",
            f"sentinel parallel-syncs {name} 1",
            f"sentinel known-replica {name} 127.0.0.1 {self.replica.port}",
        ]
        for other, sentinel in enumerate(self.sentinels):
            if other != index:
                lines.append(f"sentinel known-sentinel {name} 127.0.0.1 {sentinel.port} {self.sentinel_ids[other]}")
        path = directory / "sentinel.conf"
        path.write_text("\n".join(lines) + "\n")
        return path

    def start(self) -> None:
        self.master.start()
        self.replica.start()
        for index, sentinel in enumerate(self.sentinels):
            # A sentinel rewrites its config file, so each gets its own writable copy.
            sentinel.arguments = [str(self.write_sentinel_config(index)), "--sentinel"]
            sentinel.start()
        wait_for(self._ready, 20, "the replica to be in sync and every sentinel to see it and the other sentinels",
                 interval=0.1)  # fmt: skip

    def _ready(self) -> bool:
        if self.replica.client().info("replication").get("master_link_status") != "up":
            return False
        for sentinel in self.sentinels:
            client = sentinel.client()
            replicas = client.sentinel_slaves(SENTINEL_MASTER_NAME)
            others = client.sentinel_sentinels(SENTINEL_MASTER_NAME)
            if len(replicas) != 1 or replicas[0].get("is_sdown") or replicas[0].get("is_disconnected"):
                return False
            if len(others) != len(self.sentinels) - 1 or any(item.get("is_sdown") for item in others):
                return False
        return True

    def master_port(self) -> int | None:
        """Return the port of the master that a majority of the sentinels name, or None."""
        votes: dict[int, int] = {}
        for sentinel in self.sentinels:
            if sentinel.process is None or sentinel.process.poll() is not None:
                continue
            try:
                address = sentinel.client().sentinel_get_master_addr_by_name(SENTINEL_MASTER_NAME)
            except redis.RedisError:
                continue
            if address:
                votes[int(address[1])] = votes.get(int(address[1]), 0) + 1
        for port, count in votes.items():
            if count * 2 > len(self.sentinels):
                return port
        return None

    def stop(self) -> None:
        for process in [*self.sentinels, self.replica, self.master]:
            process.stop()


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory):
    """A three-master cluster shared by the tests of one module. Each test uses its own providers."""
    cluster = ClusterGroup(find_redis_server(), tmp_path_factory.mktemp("cluster"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def redis_sentinels(tmp_path):
    group = SentinelGroup(find_redis_server(), tmp_path / "sentinel")
    try:
        group.start()
        yield group
    finally:
        group.stop()


@pytest.fixture
def start_supervisor_at(tmp_path, sqlite_url):
    """Return a function that starts `taskvisor supervise` against a given Redis URL.

    The supervisor uses the test's SQLite file. Keyword arguments go to the config's
    `supervisor` section, as with the `start_supervisor` fixture.
    """
    started: list[SupervisorProcess] = []

    def start(redis_url: str, providers: dict, **settings) -> SupervisorProcess:
        supervisor = SupervisorProcess(tmp_path, redis_url, sqlite_url, providers, **settings)
        supervisor.start()
        started.append(supervisor)
        return supervisor

    yield start
    for supervisor in started:
        supervisor.kill_all()
