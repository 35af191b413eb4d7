"""Retention: `taskvisor purge` and the reconciliation pass delete old finished tasks, in Redis and SQL."""

import time

import pytest
import yaml
from click.testing import CliRunner

from shared.keys import WORKER_GROUP, Keys
from shared.redaction import Redactor
from shared.redis_client import ensure_group
from shared.settings import load_config
from shared.store import TaskRecord, open_store
from shared.taskstate import TaskState
from supervisor import retention
from supervisor.cli import cli
from supervisor.reconcile import Reconciler
from supervisor.retention import parse_duration
from tests.harness import wait_for

DAY = 86400.0
KEYS = Keys("taskvisor")
# Finished 40 days ago in SQL and Redis: the bulk that every purge must remove.
OLD_BULK = 1200
# Tasks that must survive a 30-day purge, whatever their age: (id, status, days since their last change).
KEPT = (
    ("recent-completed", "completed", 1),
    ("old-running", "running", 40),
    ("old-retry-waiting", "pending", 40),
)
OLD_SPECIAL = (("old-failed", "failed"), ("old-timeout", "timeout"), ("old-cancelled", "cancelled"))


def record(task_id: str, status: str, ended: float) -> TaskRecord:
    final = status in ("completed", "failed", "timeout", "cancelled")
    return TaskRecord(
        id=task_id, provider_id="p", instance_id="vm-1", user_id="u", task_type="start", status=status,
        progress=0.0, status_message="", error_message="", task_data="{}", result=None, timeout_seconds=300.0,
        attempts=1, version=3, created_at=ended - 60, started_at=ended - 30, completed_at=ended if final else None,
        updated_at=ended,
    )  # fmt: skip


def all_tasks(now: float) -> list[TaskRecord]:
    tasks = [record(f"bulk-{n}", "completed", now - 40 * DAY) for n in range(OLD_BULK)]
    tasks += [record(task_id, status, now - 40 * DAY) for task_id, status in OLD_SPECIAL]
    tasks += [record(task_id, status, now - days * DAY) for task_id, status, days in KEPT]
    return tasks


@pytest.fixture
def seeded(tmp_path, redis_server, store_url):
    """Write the same tasks into Redis (hash, history, task-index entry) and SQL; return the config path."""
    now = time.time()
    tasks = all_tasks(now)
    client = redis_server.client()
    pipe = client.pipeline(transaction=False)
    for task in tasks:
        fields = {"id": task.id, "provider": "p", "type": "start", "status": task.status, "created_at": f"{task.created_at:.6f}",
                  "updated_at": f"{task.updated_at:.6f}", "completed_at": f"{task.completed_at:.6f}" if task.completed_at else ""}  # fmt: skip
        if task.id == "old-retry-waiting":
            fields.update(retries="1", retry_at=f"{now + 60:.3f}")
        pipe.hset(KEYS.task("p", task.id), mapping=fields)
        pipe.rpush(KEYS.history("p", task.id), '{"status": "pending"}')
        pipe.hset(KEYS.task_index(), task.id, f"p 1-{len(task.id)}")
    pipe.execute()
    store = open_store(store_url)
    try:
        store.init_schema()
        store.write_batch(tasks, [])
    finally:
        store.close()

    path = tmp_path / "taskvisor.yaml"
    path.write_text(yaml.safe_dump({
        "redis": {"url": redis_server.url},
        "database": {"url": store_url},
        "supervisor": {"name": "test", "retention": 30 * DAY},
        "providers": {"p": {"driver": {"type": "command", "commands": {"start": ["true"]}}}},
    }))  # fmt: skip
    return path


def redis_ids(client) -> set[str]:
    return {name.decode() for name in client.hkeys(KEYS.task_index())}


def sql_ids(store_url: str) -> set[str]:
    store = open_store(store_url)
    try:
        return {row["id"] for row in store._select("SELECT id FROM taskvisor_tasks", ())}
    finally:
        store.close()


def expected_survivors() -> set[str]:
    return {task_id for task_id, _status, _days in KEPT}


def run_purge(config_path, *args: str):
    return CliRunner().invoke(cli, ["purge", "--config", str(config_path), *args], catch_exceptions=False)


def test_purge_command(seeded, redis_server, store_url):
    client = redis_server.client()
    removable = OLD_BULK + len(OLD_SPECIAL)

    dry = run_purge(seeded, "--older-than", "30d", "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert f"dry run: {removable} finished tasks in Redis and {removable} in SQL ended before " in dry.output
    assert "nothing was deleted" in dry.output
    assert len(redis_ids(client)) == removable + len(KEPT)
    assert len(sql_ids(store_url)) == removable + len(KEPT)

    done = run_purge(seeded, "--older-than", "30d")
    assert done.exit_code == 0, done.output
    assert f"purged {removable} finished tasks from Redis and {removable} from SQL that ended before " in done.output
    assert redis_ids(client) == expected_survivors()
    assert sql_ids(store_url) == expected_survivors()
    for task_id, _status in OLD_SPECIAL:
        assert not client.exists(KEYS.task("p", task_id), KEYS.history("p", task_id))
    for task_id in expected_survivors():
        assert client.exists(KEYS.task("p", task_id), KEYS.history("p", task_id)) == 2

    # A second run finds nothing; a shorter age reaches the task that ended a day ago,
    # but never the running or waiting ones.
    again = run_purge(seeded, "--older-than", "30d")
    assert "purged 0 finished tasks from Redis and 0 from SQL" in again.output
    recent = run_purge(seeded, "--older-than", "12h")
    assert "purged 1 finished tasks from Redis and 1 from SQL" in recent.output
    assert redis_ids(client) == {"old-running", "old-retry-waiting"}
    assert sql_ids(store_url) == {"old-running", "old-retry-waiting"}


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("30", "invalid duration '30': expected a whole number followed by s, m, h or d, such as 90m or 30d"),
        ("1.5d", "invalid duration '1.5d'"),
        ("30w", "invalid duration '30w'"),
        ("0d", "invalid duration '0d': it must be longer than 0"),
        ("-1d", "invalid duration '-1d'"),
    ],
)
def test_purge_rejects_bad_age(value, message, tmp_path):
    result = CliRunner().invoke(cli, ["purge", "--redis-url", "redis://127.0.0.1:1/0", "--database-url",
                                      f"sqlite:///{tmp_path}/x.db", "--older-than", value])  # fmt: skip
    assert result.exit_code == 2
    assert message in result.output


def test_parse_duration_units():
    assert [parse_duration(text) for text in ("45s", "90m", "12h", "30d")] == [45, 5400, 43200, 30 * 86400]


def test_reconcile_pass_purges_in_batches(seeded, redis_server, store_url, monkeypatch):
    # Smaller batches than the defaults, so that the seeded tasks take two passes.
    monkeypatch.setattr(retention, "PASS_SCAN_LIMIT", 1000)
    monkeypatch.setattr(retention, "PASS_SQL_BATCHES", 2)
    config = load_config(seeded)
    client = redis_server.client()
    ensure_group(client, KEYS.tasks("p"), WORKER_GROUP)
    reconciler = Reconciler(config, TaskState(client, KEYS, 0, 10_000, Redactor()))
    settings = config.providers["p"]
    removable = OLD_BULK + len(OLD_SPECIAL)

    first = reconciler.run_pass("p", settings)["purged"]
    assert 0 < first < removable, "one pass must delete a bounded batch"
    assert first <= 1000 + retention.SCAN_COUNT
    # The SQL rows go in a thread of their own, at most two batches of 500 per pass.
    wait_for(lambda: len(sql_ids(store_url)) == removable + len(KEPT) - 1000, 20, "the first SQL round")

    # The first pass read at least 1000 task-index entries, so the second one reaches
    # the end of the index.
    reconciler.run_pass("p", settings)
    assert redis_ids(client) == expected_survivors()
    wait_for(lambda: sql_ids(store_url) == expected_survivors(), 20, "the SQL rows of old finished tasks to go")
