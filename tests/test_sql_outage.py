"""MariaDB outages under a real supervisor: state changes wait in Redis and reach SQL in order.

Every test runs its own MariaDB server (tests/fixtures_mariadb.py) and stops it, kills its
connections or holds its row locks while tasks run. Workers never touch SQL, so tasks must
finish in Redis at their normal pace, and the mirror must write every final state once the
database is back, without moving any row to an older version.
"""

import json
import os
import re
import signal
import threading
import time
import urllib.error
import urllib.request

import pymysql
import pytest
import redis
from pymysql.constants import ER

from shared.store import TaskRecord, open_store
from shared.store.mysql import ER_CLIENT_INTERACTION_TIMEOUT
from tests.harness import command_provider, task_hash, wait_for, write_script

PROVIDER = "pool"
EVENTS = f"taskvisor:{{{PROVIDER}}}:events"
TASKS = f"taskvisor:{{{PROVIDER}}}:tasks"
# Seconds each task's command runs.
TASK_SECONDS = 0.3
# Slack on top of TASK_SECONDS for starting the command and recording its end.
RUN_SLACK_SECONDS = 1.5
OUTAGE_LOG = "database write failed; events kept in redis"
RECONNECT_LOG = "lost the connection"


@pytest.fixture
def task_script(tmp_path):
    """A command that reports progress, then runs for TASK_SECONDS, except for `held-*` tasks.

    A `held-*` task runs until the file `release` exists in the test's folder.
    """
    release = tmp_path / "release"
    return write_script(
        tmp_path / "task.sh",
        "cat >/dev/null\n"
        'echo "progress 50 working on $2"\n'
        f'case "$3" in held-*) while [ ! -e "{release}" ]; do sleep 0.05; done ;; esac\n'
        f"sleep {TASK_SECONDS}\n"
        'echo "{\\"done\\": \\"$2\\"}"\n',
    )


def push(client: redis.Redis, task_ids: list[str]) -> None:
    for task_id in task_ids:
        client.xadd(TASKS, {"id": task_id, "type": "restart", "instance": f"vm-{task_id}", "user": "alice"})


def redis_states(client: redis.Redis, task_ids: list[str]) -> dict[str, dict[str, str]]:
    return {task_id: task_hash(client, PROVIDER, task_id) for task_id in task_ids}


def all_completed_in_redis(client: redis.Redis, task_ids: list[str]) -> bool:
    return all(state.get("status") == "completed" for state in redis_states(client, task_ids).values())


def sql_rows(server) -> dict[str, dict]:
    """Read every task row with a fresh connection, since the server may have closed the last one.

    Returns no rows while the supervisor has not created the table yet.
    """
    connection = server.connect(connect_timeout=2, cursorclass=pymysql.cursors.DictCursor)
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT id, status, version, attempts, progress, result FROM taskvisor_tasks")
            return {row["id"]: row for row in cursor.fetchall()}
    except pymysql.ProgrammingError as exc:
        if exc.args[0] != ER.NO_SUCH_TABLE:
            raise
        return {}
    finally:
        connection.close()


def instance_statuses(server) -> dict[str, str]:
    connection = server.connect(connect_timeout=2)
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT id, status FROM taskvisor_instances WHERE provider_id = %s", (PROVIDER,))
            return dict(cursor.fetchall())
    finally:
        connection.close()


def mirror_connection_ids(server) -> list[int]:
    """Return the ids of the connections to the test database other than the one asking."""
    connection = server.connect()
    try:
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT id FROM information_schema.processlist WHERE db = %s AND id <> CONNECTION_ID()",
                ("taskvisor",),
            )
            return [row[0] for row in cursor.fetchall()]
    finally:
        connection.close()


def set_global(server, variable: str, value: int) -> None:
    """Change a server variable. Only connections opened afterwards get the new value."""
    connection = server.connect()
    try:
        with connection.cursor() as cursor:
            cursor.execute(f"SET GLOBAL {variable} = %s", (value,))
    finally:
        connection.close()


class VersionWatch:
    """Reads of the task table, checked so that no row ever goes back to a lower version."""

    def __init__(self, server) -> None:
        self.server = server
        self.highest: dict[str, int] = {}
        self.rows: dict[str, dict] = {}

    def read(self) -> dict[str, dict]:
        self.rows = sql_rows(self.server)
        for task_id, row in self.rows.items():
            seen = self.highest.get(task_id, 0)
            assert row["version"] >= seen, f"task {task_id} moved back from version {seen} to {row['version']}"
            self.highest[task_id] = row["version"]
        return self.rows

    def all_completed(self, task_ids: list[str]) -> bool:
        rows = self.read()
        return all(rows.get(task_id, {}).get("status") == "completed" for task_id in task_ids)


def assert_rows_match_redis(rows: dict[str, dict], client: redis.Redis, task_ids: list[str]) -> None:
    """Check each task row against the final state in its Redis status hash."""
    for task_id, state in redis_states(client, task_ids).items():
        row = rows[task_id]
        assert row["status"] == "completed", task_id
        assert row["attempts"] == 1, task_id
        assert row["progress"] == 100, task_id
        assert row["version"] == int(state["version"]), task_id
        assert json.loads(row["result"]) == {"done": f"vm-{task_id}"}, task_id


def mirror_caught_up(client: redis.Redis) -> bool:
    """Return whether the mirror group has read and acknowledged every event of the provider."""
    newest = client.xrevrange(EVENTS, count=1)
    group = next(group for group in client.xinfo_groups(EVENTS) if group["name"] == b"mirror")
    return group["pending"] == 0 and group["last-delivered-id"] == newest[0][0]


def mirror_pids(log: str) -> list[int]:
    """Return the process ids of the mirrors that the supervisor started, oldest first."""
    return [int(pid) for pid in re.findall(r"mirror\[(\d+)\] supervisor\.mirror: mirror started", log)]


def readiness(health_url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"{health_url}/readyz", timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_outage_mid_batch(mariadb_server, redis_server, start_supervisor, task_script):
    supervisor = start_supervisor(
        {PROVIDER: command_provider(task_script, concurrent=4)}, database_url=mariadb_server.url, health={}
    )
    health_url = supervisor.health_url()
    client = redis_server.client()
    before = [f"before-{index}" for index in range(4)]
    during = [f"during-{index}" for index in range(16)]
    push(client, before)
    watch = VersionWatch(mariadb_server)
    wait_for(lambda: watch.all_completed(before), 20, "the first tasks to reach SQL")

    mariadb_server.stop()
    outage_started = time.monotonic()
    push(client, during)
    wait_for(lambda: all_completed_in_redis(client, during), 15, "the batch to complete in Redis")
    batch_seconds = time.monotonic() - outage_started

    # Four workers run the 16 tasks in four rounds, so a worker that waited on SQL would stretch the batch.
    assert batch_seconds < 4 * (TASK_SECONDS + RUN_SLACK_SECONDS)
    for task_id, state in redis_states(client, during).items():
        run_seconds = float(state["completed_at"]) - float(state["started_at"])
        assert run_seconds < TASK_SECONDS + RUN_SLACK_SECONDS, task_id
    wait_for(lambda: OUTAGE_LOG in supervisor.log(), 10, "the mirror to log the failed write")
    wait_for(lambda: readiness(health_url)[0] == 503, 10, "/readyz to report the database")
    _status, verdict = readiness(health_url)
    assert any("database check failed" in reason for reason in verdict["reasons"]), verdict

    mariadb_server.start()
    wait_for(lambda: watch.all_completed(before + during), 30, "every task to reach SQL after the outage")
    assert len(watch.rows) == 20
    assert_rows_match_redis(watch.rows, client, before + during)
    assert instance_statuses(mariadb_server) == {f"vm-{task_id}": "running" for task_id in before + during}
    wait_for(lambda: readiness(health_url)[0] == 200, 15, "/readyz to recover")

    # Deliver every event to the mirror again, as after a crash between commit and ack.
    client.xgroup_setid(EVENTS, "mirror", "0")
    wait_for(lambda: mirror_caught_up(client), 15, "the mirror to read every event again")
    assert_rows_match_redis(watch.read(), client, before + during)
    assert instance_statuses(mariadb_server) == {f"vm-{task_id}": "running" for task_id in before + during}
    assert supervisor.stop() == 0


def test_stale_events_ignored(mariadb_server, redis_server, start_supervisor, task_script):
    """Old snapshots that arrive after the final one do not move a task row back."""
    start_supervisor({PROVIDER: command_provider(task_script, concurrent=2)}, database_url=mariadb_server.url)
    client = redis_server.client()
    task_ids = [f"task-{index}" for index in range(4)]
    push(client, task_ids)
    watch = VersionWatch(mariadb_server)
    wait_for(lambda: watch.all_completed(task_ids), 20, "the tasks to reach SQL")
    wait_for(lambda: mirror_caught_up(client), 10, "the mirror to acknowledge every event")

    # Append a copy of every earlier snapshot (pending, running, progress) after the final ones.
    stale = [fields for _entry, fields in client.xrange(EVENTS) if fields[b"status"] != b"completed"]
    assert len(stale) >= 3 * len(task_ids)
    for fields in stale:
        client.xadd(EVENTS, {**fields, b"instance_changed": b"0"})
    wait_for(lambda: mirror_caught_up(client), 10, "the mirror to read the stale snapshots")

    assert_rows_match_redis(watch.read(), client, task_ids)


def test_killed_connection_reconnects(mariadb_server, redis_server, start_supervisor, task_script):
    supervisor = start_supervisor({PROVIDER: command_provider(task_script)}, database_url=mariadb_server.url)
    client = redis_server.client()
    watch = VersionWatch(mariadb_server)
    push(client, ["first"])
    wait_for(lambda: watch.all_completed(["first"]), 20, "the first task to reach SQL")

    connections = mirror_connection_ids(mariadb_server)
    assert len(connections) == 1, connections
    killer = mariadb_server.connect()
    with killer.cursor() as cursor:
        cursor.execute(f"KILL CONNECTION {connections[0]}")
    killer.close()
    push(client, ["second"])
    wait_for(lambda: watch.all_completed(["second"]), 10, "the second task to reach SQL")

    assert_rows_match_redis(watch.rows, client, ["first", "second"])
    reconnected = mirror_connection_ids(mariadb_server)
    assert len(reconnected) == 1
    assert reconnected != connections
    assert RECONNECT_LOG in supervisor.log()
    assert OUTAGE_LOG not in supervisor.log()


def test_idle_timeout_reconnects(mariadb_server, redis_server, start_supervisor, task_script):
    set_global(mariadb_server, "wait_timeout", 1)
    supervisor = start_supervisor({PROVIDER: command_provider(task_script)}, database_url=mariadb_server.url)
    client = redis_server.client()
    watch = VersionWatch(mariadb_server)
    push(client, ["first"])
    wait_for(lambda: watch.all_completed(["first"]), 20, "the first task to reach SQL")
    wait_for(lambda: not mirror_connection_ids(mariadb_server), 10, "the server to close the idle connection")

    push(client, ["second"])
    wait_for(lambda: watch.all_completed(["second"]), 10, "the second task to reach SQL")

    assert_rows_match_redis(watch.rows, client, ["first", "second"])
    assert RECONNECT_LOG in supervisor.log()
    assert OUTAGE_LOG not in supervisor.log()


def test_lock_wait_retried(mariadb_server, redis_server, start_supervisor, task_script, tmp_path):
    set_global(mariadb_server, "innodb_lock_wait_timeout", 1)
    supervisor = start_supervisor(
        {PROVIDER: command_provider(task_script, concurrent=2)}, database_url=mariadb_server.url
    )
    client = redis_server.client()
    watch = VersionWatch(mariadb_server)
    push(client, ["held-1"])
    wait_for(lambda: watch.read().get("held-1", {}).get("status") == "running", 20, "held-1 to run in SQL")

    holder = mariadb_server.connect()
    holder.begin()
    with holder.cursor() as cursor:
        cursor.execute("SELECT status FROM taskvisor_tasks WHERE id = 'held-1' FOR UPDATE")
    others = [f"other-{index}" for index in range(3)]
    (tmp_path / "release").touch()
    push(client, others)
    wait_for(lambda: all_completed_in_redis(client, ["held-1", *others]), 15, "the tasks to complete in Redis")
    wait_for(lambda: "failed with error 1205" in supervisor.log(), 10, "a lock wait timeout to be retried")
    wait_for(lambda: OUTAGE_LOG in supervisor.log(), 15, "the retries to run out")
    assert watch.read()["held-1"]["status"] == "running"

    holder.rollback()
    holder.close()
    wait_for(lambda: watch.all_completed(["held-1", *others]), 20, "every task to reach SQL after the lock")
    assert_rows_match_redis(watch.rows, client, ["held-1", *others])


def test_supervisor_restart_during_outage(mariadb_server, redis_server, start_supervisor, task_script):
    providers = {PROVIDER: command_provider(task_script, concurrent=2)}
    first = start_supervisor(providers, database_url=mariadb_server.url)
    client = redis_server.client()
    watch = VersionWatch(mariadb_server)
    push(client, ["before-0", "before-1"])
    wait_for(lambda: watch.all_completed(["before-0", "before-1"]), 20, "the first tasks to reach SQL")

    # A crash this time: the rows committed before it must survive InnoDB's recovery.
    mariadb_server.stop(kill=True)
    during = [f"during-{index}" for index in range(4)]
    push(client, during)
    wait_for(lambda: all_completed_in_redis(client, during), 15, "the tasks to complete in Redis")
    wait_for(lambda: OUTAGE_LOG in first.log(), 10, "the mirror to log the failed write")
    stop_started = time.monotonic()
    assert first.stop() == 0
    # The mirror must not hold the shutdown until the supervisor kills it.
    assert time.monotonic() - stop_started < 5
    assert not mirror_caught_up(client)

    mariadb_server.start()
    second = start_supervisor(providers, database_url=mariadb_server.url)
    after = ["after-0", "after-1"]
    push(client, after)
    every = ["before-0", "before-1", *during, *after]
    wait_for(lambda: watch.all_completed(every), 30, "every task to reach SQL")
    assert_rows_match_redis(watch.rows, client, every)
    assert second.stop() == 0


def test_mirror_restarted_during_outage(mariadb_server, redis_server, start_supervisor, task_script):
    """A mirror that starts while the database is down waits for it instead of crashing."""
    supervisor = start_supervisor({PROVIDER: command_provider(task_script)}, database_url=mariadb_server.url)
    client = redis_server.client()
    watch = VersionWatch(mariadb_server)
    push(client, ["before"])
    wait_for(lambda: watch.all_completed(["before"]), 20, "the first task to reach SQL")

    mariadb_server.stop()
    first_mirror = mirror_pids(supervisor.log())[-1]
    os.kill(first_mirror, signal.SIGKILL)
    wait_for(lambda: len(mirror_pids(supervisor.log())) == 2, 10, "the supervisor to start a new mirror")
    push(client, ["during"])
    wait_for(lambda: all_completed_in_redis(client, ["during"]), 10, "the task to complete in Redis")
    wait_for(lambda: OUTAGE_LOG in supervisor.log(), 10, "the new mirror to log the outage")

    mariadb_server.start()
    wait_for(lambda: watch.all_completed(["before", "during"]), 20, "the task to reach SQL")
    assert_rows_match_redis(watch.rows, client, ["before", "during"])
    assert "child process crashed role=mirror" not in supervisor.log()
    assert "database writes resumed" in supervisor.log()


def test_supervisor_starts_while_database_down(mariadb_server, redis_server, start_supervisor, task_script):
    providers = {PROVIDER: command_provider(task_script)}
    client = redis_server.client()
    mariadb_server.stop()
    supervisor = start_supervisor(providers, database_url=mariadb_server.url)
    push(client, ["during-0"])
    wait_for(
        lambda: supervisor.process.poll() is not None or all_completed_in_redis(client, ["during-0"]),
        15,
        "the task to complete in Redis",
    )
    assert supervisor.process.poll() is None, supervisor.log()
    assert "database unavailable at start; tasks run and their states wait in redis" in supervisor.log()

    mariadb_server.start()
    watch = VersionWatch(mariadb_server)
    wait_for(lambda: watch.all_completed(["during-0"]), 30, "the task to reach SQL")
    assert supervisor.stop() == 0


def test_deadlock_retried(mariadb_server, caplog):
    """A write chosen as a deadlock victim is rolled back and retried until it commits."""
    store = open_store(mariadb_server.url)
    store.init_schema()
    first, second = task_record("deadlock-a", 1), task_record("deadlock-b", 1)
    store.write_batch([first, second], [])

    holder = mariadb_server.connect()
    with holder.cursor() as cursor:
        cursor.execute("CREATE TABLE ballast (n INT PRIMARY KEY)")
        holder.begin()
        # Undo records make this transaction heavier, so InnoDB picks the store's write as the victim.
        cursor.executemany("INSERT INTO ballast VALUES (%s)", [(n,) for n in range(200)])
        cursor.execute("SELECT id FROM taskvisor_tasks WHERE id = 'deadlock-b' FOR UPDATE")

    newer = [task_record("deadlock-a", 2, "running"), task_record("deadlock-b", 2, "running")]
    writer = threading.Thread(target=store.write_batch, args=(newer, []))
    writer.start()
    wait_for(lambda: lock_waits(mariadb_server) == 1, 10, "the store's write to wait for deadlock-b")
    with holder.cursor() as cursor:
        cursor.execute("SELECT id FROM taskvisor_tasks WHERE id = 'deadlock-a' FOR UPDATE")
    holder.commit()
    holder.close()
    writer.join(15)

    assert not writer.is_alive()
    assert "failed with error 1213" in caplog.text
    assert {task_id: row["version"] for task_id, row in sql_rows(mariadb_server).items()} == {
        "deadlock-a": 2,
        "deadlock-b": 2,
    }
    store.close()


@pytest.mark.parametrize("code", [ER_CLIENT_INTERACTION_TIMEOUT, ER.SERVER_SHUTDOWN])
def test_server_farewell_error_reconnects(mariadb_server, caplog, code):
    """An error that a server sends just before it closes the connection makes the store reconnect.

    MariaDB 10.11 only closes the socket, so the error is raised here in place of the server.
    """
    store = open_store(mariadb_server.url)
    store.init_schema()
    closing = store._connection

    def farewell() -> None:
        raise pymysql.OperationalError(code, "the server closes this connection")

    closing.begin = farewell
    store.write_batch([task_record("after-farewell", 1)], [])

    assert f"lost the connection (({code}," in caplog.text
    assert store._connection is not closing
    assert sql_rows(mariadb_server)["after-farewell"]["version"] == 1
    store.close()


def task_record(task_id: str, version: int, status: str = "pending") -> TaskRecord:
    return TaskRecord(
        id=task_id, provider_id=PROVIDER, instance_id=None, user_id="alice", task_type="start", status=status,
        progress=0.0, status_message="", error_message="", task_data="{}", result=None, timeout_seconds=60.0,
        attempts=0, version=version, created_at=1714564800.0, started_at=None, completed_at=None,
        updated_at=1714564800.0 + version,
    )  # fmt: skip


def lock_waits(server) -> int:
    connection = server.connect()
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT COUNT(*) FROM information_schema.innodb_trx WHERE trx_state = 'LOCK WAIT'")
            return cursor.fetchone()[0]
    finally:
        connection.close()
