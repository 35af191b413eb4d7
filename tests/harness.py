"""A real supervisor in a child process, driven the way an operator would drive it."""

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import redis
import yaml

REPO = Path(__file__).resolve().parent.parent


def wait_for(condition: Callable[[], object], timeout: float, what: str, interval: float = 0.05):
    """Poll `condition` until it returns a true value or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def write_script(path: Path, body: str) -> str:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return str(path)


def command_provider(script: str, concurrent: int = 0, timeouts: dict | None = None, kill_grace: float = 1.0) -> dict:
    """Provider settings that run `script TYPE INSTANCE ID` for every task type."""
    commands = {
        task_type: [script, task_type, "{instance}", "{id}"]
        for task_type in ("create", "start", "stop", "restart", "delete", "reset", "reset-password")
    }
    provider: dict = {"driver": {"type": "command", "killGrace": kill_grace, "commands": commands}}
    if concurrent:
        provider["allowConcurrentTasks"] = True
        provider["maxConcurrentTasks"] = concurrent
    if timeouts:
        provider["timeouts"] = timeouts
    return provider


class SupervisorProcess:
    """`taskvisor supervise` as a subprocess with its log in a file.

    The health endpoint is off unless `health` is given. Its settings then default to
    port 0, a free port, which `health_url` reads from the log.
    """

    def __init__(
        self, tmp_path: Path, redis_url: str, database_url: str, providers: dict, health: dict | None = None,
        redis_options: dict | None = None, **supervisor: object,
    ) -> None:  # fmt: skip
        self.tmp_path = tmp_path
        self.config_path = tmp_path / "taskvisor.yaml"
        self.log_path = tmp_path / "supervisor.log"
        document = {
            "redis": {"url": redis_url, **(redis_options or {})},
            "database": {"url": database_url},
            "supervisor": {"name": "test", "shutdownGrace": 5, "leaseSeconds": 3, **supervisor},
            "providers": providers,
            "health": {"enabled": False} if health is None else {"port": 0, **health},
        }
        self.config_path.write_text(yaml.safe_dump(document))
        self.redis_url = redis_url
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        env = dict(os.environ, PYTHONPATH=str(REPO))
        self.log_file = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "supervisor", "--log-level", "DEBUG", "supervise", "--config", str(self.config_path)],
            stdout=self.log_file,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=self.tmp_path,
        )

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.process.send_signal(signum)
        code = self.process.wait(timeout)
        self.log_file.close()
        return code

    def kill_all(self) -> None:
        """SIGKILL the supervisor and every process it started (cleanup after a test)."""
        import psutil

        if self.process is None:
            return
        try:
            parent = psutil.Process(self.process.pid)
            family = parent.children(recursive=True) + [parent]
        except psutil.NoSuchProcess:
            family = []
        for proc in family:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        if self.process.poll() is None:
            self.process.wait(10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def health_url(self, timeout: float = 10) -> str:
        """Wait for the monitor's start line and return the URL it logged last."""

        def logged_url() -> str | None:
            found = re.findall(r"health endpoint listening url=(\S+)", self.log())
            return found[-1] if found else None

        return wait_for(logged_url, timeout, "the health endpoint to listen")


def task_hash(client: redis.Redis, provider: str, task_id: str) -> dict[str, str]:
    raw = client.hgetall(f"taskvisor:{{{provider}}}:task:{task_id}")
    return {name.decode(): value.decode() for name, value in raw.items()}


def redis_cli_xadd(port: int, stream: str, fields: dict[str, str]) -> str:
    """Push an entry with the redis-cli binary, as a shell-script producer would."""
    argv = ["redis-cli", "-p", str(port), "XADD", stream, "*"]
    for name, value in fields.items():
        argv += [name, value]
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout.strip()


def cli(config_path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run `taskvisor ARGS` with TASKVISOR_CONFIG pointing at a test's config file."""
    env = dict(os.environ, PYTHONPATH=str(REPO), TASKVISOR_CONFIG=str(config_path))
    return subprocess.run([sys.executable, "-m", "supervisor", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)  # fmt: skip
