"""A private redis-server on a free loopback port, without persistence, for one benchmark run."""

import os
import shutil
import socket
import subprocess
import threading
import time

import redis

START_TIMEOUT_SECONDS = 10.0
# The standard ports of Redis and MariaDB, which belong to servers that this machine may run
# for other purposes. The kernel hands out ports from its ephemeral range, so skipping
# these is only a guard.
RESERVED_PORTS = frozenset({6379, 3306})


def free_loopback_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago and is not one of RESERVED_PORTS."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        if port not in RESERVED_PORTS:
            return port


class PrivateRedis:
    """One `redis-server --save '' --appendonly no` bound to 127.0.0.1, stopped by `stop()`."""

    def __init__(self, workdir: str) -> None:
        self.workdir = workdir
        self.process: subprocess.Popen | None = None
        self.port = 0
        self.client: redis.Redis | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise SystemExit("redis-server is not installed: run apt-get install redis-server, then try again")
        os.makedirs(self.workdir, exist_ok=True)
        # The port can be taken between the probe and the server's bind, so try a few.
        for _attempt in range(5):
            self.port = free_loopback_port()
            log_path = os.path.join(self.workdir, f"redis-{self.port}.log")
            self.process = subprocess.Popen(
                [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                 "--dir", self.workdir, "--logfile", log_path, "--daemonize", "no"],
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )  # fmt: skip
            if self._wait_ready():
                return
            self.stop()
        raise SystemExit(f"redis-server did not start on a free loopback port; see the logs in {self.workdir}")

    def _wait_ready(self) -> bool:
        client = redis.Redis(host="127.0.0.1", port=self.port)
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            try:
                client.ping()
            except redis.ConnectionError:
                time.sleep(0.05)
                continue
            self.client = client
            return True
        return False

    def version(self) -> str:
        return self.client.info("server")["redis_version"]

    def cpu_seconds(self) -> float:
        """Return the CPU time (user + system) that the server has used since it started."""
        info = self.client.info("cpu")
        return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])

    def flush(self) -> None:
        self.client.flushall()

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None


class MemorySampler:
    """A daemon thread that reads the server's `used_memory` (INFO memory) every `interval` seconds until `stop()`.

    It reads through its own connection, so that it does not share a socket with the caller.
    """

    def __init__(self, url: str, interval: float) -> None:
        self.client = redis.Redis.from_url(url)
        self.interval = interval
        self.samples: list[int] = []
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self.run, name="redis-memory-sampler", daemon=True)

    def used_memory(self) -> int:
        return int(self.client.info("memory")["used_memory"])

    def run(self) -> None:
        while True:
            self.samples.append(self.used_memory())
            if self.stopped.wait(self.interval):
                return

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> int:
        """Stop sampling and return the highest `used_memory` in bytes, a last reading included."""
        self.stopped.set()
        self.thread.join()
        self.samples.append(self.used_memory())
        self.client.close()
        return max(self.samples)
