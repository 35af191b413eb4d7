"""The RQ job functions of the benchmark."""

import subprocess

from bench_common import (
    SLEEP_SECONDS,
    LazyClient,
    latency_mode,
    record_pid,
    record_task,
)

QUEUE = "bench"

_client = LazyClient()
_record_start = latency_mode()


def noop(number: int) -> None:
    record_task(_client.get(), number, _record_start)


def sleep_subprocess(name: str) -> None:
    """Run `sleep 30` as a child of the work horse (cancel measurement)."""
    process = subprocess.Popen(["sleep", str(SLEEP_SECONDS)])
    record_pid(name, process.pid)
    process.wait()
