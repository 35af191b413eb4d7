"""The SQL store on real databases: a SQLite file and a throwaway MariaDB database."""

import math
import socket
import sqlite3
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import unquote, urlsplit

import msgspec
import pymysql
import pytest

from shared.errors import StoreError
from shared.store import InstanceRecord, Store, TaskRecord, open_store, redact_url
from shared.store.base import format_micros

# 2024-05-01 12:00:00 UTC, with a fraction that needs all six digits of microseconds.
BASE_TIME = 1714564800.123456


def make_task(task_id: str, version: int = 1, **changes: object) -> TaskRecord:
    task = TaskRecord(
        id=task_id,
        provider_id="hetzner",
        instance_id="vm-1",
        user_id="alice",
        task_type="create",
        status="pending",
        progress=0.0,
        status_message="",
        error_message="",
        task_data='{"image": "debian-12"}',
        result=None,
        timeout_seconds=300.0,
        attempts=0,
        version=version,
        created_at=BASE_TIME,
        started_at=None,
        completed_at=None,
        updated_at=BASE_TIME,
    )
    return msgspec.structs.replace(task, **changes)


def make_instance(instance_id: str, version: int, status: str, last_task_id: str) -> InstanceRecord:
    return InstanceRecord(
        id=instance_id,
        provider_id="hetzner",
        status=status,
        last_task_id=last_task_id,
        version=version,
        updated_at=BASE_TIME + version,
    )


def run_sql(url: str, sql: str) -> list[tuple]:
    """Run one statement on the database behind `url` outside the store, for setup and checks."""
    parts = urlsplit(url)
    if parts.scheme == "sqlite":
        connection = sqlite3.connect(parts.path[1:])
        try:
            with connection:
                return connection.execute(sql).fetchall()
        finally:
            connection.close()

    connection = pymysql.connect(
        host=parts.hostname,
        port=parts.port,
        user=unquote(parts.username or ""),
        password=unquote(parts.password or ""),
        database=parts.path[1:],
        autocommit=True,
    )
    try:
        with connection.cursor() as cursor:
            cursor.execute(sql)
            return list(cursor.fetchall())
    finally:
        connection.close()


@pytest.fixture
def store(store_url: str) -> Iterator[Store]:
    opened = open_store(store_url)
    opened.init_schema()
    yield opened
    opened.close()


def test_init_schema_twice(store_url: str) -> None:
    with open_store(store_url) as first:
        first.init_schema()
        first.write_batch([make_task("t1")], [])
    with open_store(store_url) as second:
        second.init_schema()
        task = second.get_task("t1")

    assert task is not None
    assert task["status"] == "pending"
    assert run_sql(store_url, "SELECT version FROM taskvisor_schema") == [(1,)]


def test_init_schema_concurrent(store_url: str) -> None:
    stores = [open_store(store_url) for _ in range(4)]
    try:
        with ThreadPoolExecutor(max_workers=len(stores)) as pool:
            futures = [pool.submit(store.init_schema) for store in stores]
            for future in futures:
                future.result()
    finally:
        for store in stores:
            store.close()

    assert run_sql(store_url, "SELECT version FROM taskvisor_schema") == [(1,)]


def test_newer_schema_rejected(store_url: str) -> None:
    with open_store(store_url) as store:
        store.init_schema()
    run_sql(store_url, "INSERT INTO taskvisor_schema (version, applied_at) VALUES (99, '2030-01-01 00:00:00')")

    with open_store(store_url) as store:
        with pytest.raises(StoreError, match="schema version 99") as caught:
            store.init_schema()
    assert "upgrade taskvisor" in str(caught.value)


def test_write_then_get_task(store: Store) -> None:
    written = make_task(
        "t1",
        version=3,
        instance_id=None,
        status="completed",
        progress=100.0,
        status_message="done",
        error_message="",
        result='{"ip": "192.0.2.7"}',
        attempts=2,
        started_at=BASE_TIME + 1.5,
        completed_at=BASE_TIME + 60.000001,
        updated_at=BASE_TIME + 60.000001,
    )
    store.write_batch([written], [])

    task = store.get_task("t1")
    assert task is not None
    assert set(task) == set(msgspec.structs.asdict(written))
    for column, value in msgspec.structs.asdict(written).items():
        if isinstance(value, float):
            assert task[column] == pytest.approx(value, abs=1e-6), column
        else:
            assert task[column] == value, column


def test_get_missing_task(store: Store) -> None:
    assert store.get_task("nope") is None
    assert store.get_instance("hetzner", "nope") is None


def test_times_keep_microseconds(store: Store) -> None:
    store.write_batch([make_task("t1", created_at=BASE_TIME)], [])

    task = store.get_task("t1")
    assert task is not None
    assert round(task["created_at"] * 1_000_000) == round(BASE_TIME * 1_000_000)
    assert task["started_at"] is None


def test_newer_version_wins(store: Store) -> None:
    store.write_batch([make_task("t1", version=1, status="pending")], [])
    store.write_batch([make_task("t1", version=2, status="running", progress=40.0, attempts=1)], [])

    task = store.get_task("t1")
    assert task is not None
    assert task["status"] == "running"
    assert task["progress"] == 40.0
    assert task["attempts"] == 1
    assert task["version"] == 2


def test_update_keeps_registered_columns(store: Store) -> None:
    """Check that a newer event updates the changing columns. The registered columns keep their first value."""
    store.write_batch([make_task("t1", version=1, status="pending", instance_id=None)], [])
    newer = make_task("t1", version=3, status="completed", instance_id="vm-9", progress=100.0, result='{"ip": "10.0.0.5"}',
                      started_at=BASE_TIME + 1, completed_at=BASE_TIME + 2, updated_at=BASE_TIME + 2,
                      user_id="mallory", task_type="delete", task_data="{}", timeout_seconds=5.0, created_at=BASE_TIME + 9)
    store.write_batch([newer], [])

    task = store.get_task("t1")
    assert task is not None
    assert task["status"] == "completed"
    assert task["instance_id"] == "vm-9"
    assert task["result"] == '{"ip": "10.0.0.5"}'
    assert task["version"] == 3
    assert round(task["completed_at"] - task["started_at"], 6) == 1.0
    assert task["user_id"] == "alice"
    assert task["task_type"] == "create"
    assert task["task_data"] == '{"image": "debian-12"}'
    assert task["timeout_seconds"] == 300.0
    assert round(task["created_at"] * 1_000_000) == round(BASE_TIME * 1_000_000)


@pytest.mark.parametrize(("micros", "text"), [
    (0, "1970-01-01 00:00:00.000000"),
    (1714564800123456, "2024-05-01 12:00:00.123456"),
    (1714564800999999, "2024-05-01 12:00:00.999999"),
    (1714564801000001, "2024-05-01 12:00:01.000001"),
    (-1, "1969-12-31 23:59:59.999999"),
    (253402300799999999, "9999-12-31 23:59:59.999999"),
])
def test_time_column_text(micros: int, text: str) -> None:
    # The second call for the same second uses the cached date and time.
    assert format_micros(micros) == text
    assert format_micros(micros) == text


def test_time_beyond_year_9999_rejected() -> None:
    with pytest.raises(OverflowError):
        format_micros(253402300800000000)


def test_older_version_ignored(store: Store) -> None:
    store.write_batch([make_task("t1", version=5, status="completed", progress=100.0)], [])
    store.write_batch([make_task("t1", version=2, status="running", progress=40.0)], [])
    store.write_batch([make_task("t1", version=5, status="failed", progress=10.0)], [])

    task = store.get_task("t1")
    assert task is not None
    assert task["status"] == "completed"
    assert task["progress"] == 100.0
    assert task["version"] == 5


def test_batch_keeps_newest_version(store: Store) -> None:
    store.write_batch(
        [
            make_task("t1", version=1, status="pending"),
            make_task("t1", version=3, status="completed"),
            make_task("t1", version=2, status="running"),
        ],
        [],
    )

    task = store.get_task("t1")
    assert task is not None
    assert task["status"] == "completed"
    assert task["version"] == 3


def test_instance_upsert_by_version(store: Store) -> None:
    store.write_batch([], [make_instance("vm-1", 10, "running", "t1")])
    store.write_batch([], [make_instance("vm-1", 12, "stopped", "t2")])
    store.write_batch([], [make_instance("vm-1", 11, "deleted", "t3")])

    instance = store.get_instance("hetzner", "vm-1")
    assert instance is not None
    assert instance["status"] == "stopped"
    assert instance["last_task_id"] == "t2"
    assert instance["version"] == 12
    assert instance["updated_at"] == pytest.approx(BASE_TIME + 12, abs=1e-6)
    assert store.get_instance("other-provider", "vm-1") is None


def test_ids_are_case_sensitive(store: Store) -> None:
    store.write_batch([make_task("Task-1", status="pending"), make_task("task-1", status="running")], [])

    upper = store.get_task("Task-1")
    lower = store.get_task("task-1")
    assert upper is not None and upper["status"] == "pending"
    assert lower is not None and lower["status"] == "running"


def test_progress_clamped(store: Store) -> None:
    store.write_batch([make_task("high", progress=150.0), make_task("nan", progress=math.nan)], [])

    high = store.get_task("high")
    not_a_number = store.get_task("nan")
    assert high is not None and high["progress"] == 100.0
    assert not_a_number is not None and not_a_number["progress"] == 0.0


def test_invalid_record_writes_nothing(store: Store) -> None:
    with pytest.raises(StoreError, match="task 'broken'"):
        store.write_batch([make_task("good"), make_task("broken", created_at=math.inf)], [])

    assert store.get_task("good") is None


def test_list_filters(store: Store) -> None:
    store.write_batch(
        [
            make_task("a", status="running", provider_id="hetzner", user_id="alice", instance_id="vm-1"),
            make_task("b", status="pending", provider_id="hetzner", user_id="bob", instance_id="vm-2"),
            make_task("c", status="running", provider_id="ovh", user_id="bob", instance_id=None, task_type="stop"),
        ],
        [],
    )

    def ids(**filters: object) -> list[str]:
        return sorted(row["id"] for row in store.list_tasks(**filters))

    assert ids() == ["a", "b", "c"]
    assert ids(status="running") == ["a", "c"]
    assert ids(provider="ovh") == ["c"]
    assert ids(user="bob") == ["b", "c"]
    assert ids(instance="vm-2") == ["b"]
    assert ids(task_type="stop") == ["c"]
    assert ids(status="running", user="bob") == ["c"]
    assert ids(status="cancelled") == []


def test_list_newest_first(store: Store) -> None:
    store.write_batch(
        [
            make_task("old", created_at=BASE_TIME),
            make_task("new", created_at=BASE_TIME + 10),
            make_task("middle", created_at=BASE_TIME + 5),
        ],
        [],
    )

    rows = store.list_tasks()
    assert [row["id"] for row in rows] == ["new", "middle", "old"]
    assert rows[0]["created_at"] == pytest.approx(BASE_TIME + 10, abs=1e-6)


def test_keyset_pages_cover_all(store: Store) -> None:
    # Groups of three tasks share a created_at, so pages must break ties on id.
    tasks = [make_task(f"t{index:03d}", created_at=BASE_TIME + index // 3) for index in range(47)]
    store.write_batch(tasks, [])
    expected = [task.id for task in sorted(tasks, key=lambda task: (task.created_at, task.id), reverse=True)]

    seen: list[str] = []
    pages = 0
    cursor = None
    while True:
        page = store.list_tasks(limit=5, before=cursor)
        if not page:
            break
        pages += 1
        seen.extend(row["id"] for row in page)
        cursor = store.cursor_for(page[-1])

    assert seen == expected
    assert pages == 10


def test_keyset_pages_with_filter(store: Store) -> None:
    tasks = [
        make_task(f"t{index:02d}", status="running" if index % 2 else "pending", created_at=BASE_TIME + index)
        for index in range(20)
    ]
    store.write_batch(tasks, [])

    first = store.list_tasks(status="running", limit=4)
    second = store.list_tasks(status="running", limit=4, before=store.cursor_for(first[-1]))

    assert [row["id"] for row in first] == ["t19", "t17", "t15", "t13"]
    assert [row["id"] for row in second] == ["t11", "t09", "t07", "t05"]


def test_list_limit_clamped(store: Store) -> None:
    store.write_batch([make_task(f"t{index:03d}", created_at=BASE_TIME + index) for index in range(501)], [])

    assert len(store.list_tasks(limit=0)) == 1
    assert len(store.list_tasks(limit=-5)) == 1
    assert len(store.list_tasks(limit=10_000)) == 500


def test_invalid_cursor(store: Store) -> None:
    with pytest.raises(StoreError, match="invalid cursor") as caught:
        store.list_tasks(before="not a cursor!")
    assert "pass the cursor printed at the end of the previous page" in str(caught.value)


def test_count_by_status(store: Store) -> None:
    assert store.count_by_status() == {}

    store.write_batch(
        [
            make_task("a", status="running"),
            make_task("b", status="running"),
            make_task("c", status="failed"),
        ],
        [],
    )
    assert store.count_by_status() == {"running": 2, "failed": 1}


def test_batch_of_5000(store: Store) -> None:
    tasks = [make_task(f"bulk-{index:05d}", created_at=BASE_TIME + index / 1000) for index in range(5000)]
    instances = [make_instance(f"vm-{index:04d}", 1, "running", f"bulk-{index:05d}") for index in range(1000)]

    started = time.perf_counter()
    store.write_batch(tasks, instances)
    elapsed = time.perf_counter() - started
    print(f"{store!r}: wrote {len(tasks) + len(instances)} rows in {elapsed:.3f} s")

    assert store.count_by_status() == {"pending": 5000}
    assert store.get_instance("hetzner", "vm-0999") is not None
    newest = store.list_tasks(limit=1)
    assert newest[0]["id"] == "bulk-04999"


def test_closed_store_raises(store_url: str) -> None:
    store = open_store(store_url)
    store.close()
    store.close()

    with pytest.raises(StoreError, match="closed"):
        store.get_task("t1")


def test_mariadb_reconnects(mariadb_url: str, caplog: pytest.LogCaptureFixture) -> None:
    database = urlsplit(mariadb_url).path[1:]
    with open_store(mariadb_url) as store:
        store.init_schema()
        store.write_batch([make_task("t1", version=1)], [])

        # Kill the store's connection from outside, as a server restart or idle timeout would.
        store_connections = run_sql(
            mariadb_url,
            f"SELECT id FROM information_schema.processlist WHERE db = '{database}' AND id <> CONNECTION_ID()",
        )
        assert len(store_connections) == 1
        run_sql(mariadb_url, f"KILL {store_connections[0][0]}")

        store.write_batch([make_task("t1", version=2, status="running")], [])
        task = store.get_task("t1")

    assert task is not None
    assert task["status"] == "running"
    assert "reconnecting" in caplog.text


def test_sqlite_relative_path(tmp_path: Path) -> None:
    (tmp_path / "config" / "data").mkdir(parents=True)
    with open_store("sqlite:///data/tasks.db", base_dir=str(tmp_path / "config")) as store:
        assert store.path == str(tmp_path / "config" / "data" / "tasks.db")

    with pytest.raises(StoreError, match="does not exist"):
        open_store("sqlite:///missing/tasks.db", base_dir=str(tmp_path))


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("postgres://alice:secret@db/tasks", "unknown scheme"),
        ("taskvisor.db", "missing scheme"),
        ("sqlite://host/tasks.db", "no host"),
        ("sqlite:///", "file name is missing"),
        ("mysql://alice:secret@db:99999/tasks", "port"),
        ("mysql://alice:secret@db:3306/", "database name is missing"),
        ("mysql://db:3306/tasks", "user is missing"),
        ("mariadb://alice:secret@/tasks", "host is missing"),
    ],
)
def test_bad_url(url: str, reason: str) -> None:
    with pytest.raises(StoreError) as caught:
        open_store(url)

    message = str(caught.value)
    assert reason in message
    assert "secret" not in message
    assert "sqlite:////absolute/path.db" in message


def test_redact_url() -> None:
    assert redact_url("mysql://alice:p%40ss@db:3306/tasks") == "mysql://alice:***@db:3306/tasks"
    assert redact_url("mysql://alice:p@ss/word@db/tasks") == "mysql://alice:***@db/tasks"
    assert redact_url("mysql://alice@db/tasks") == "mysql://alice@db/tasks"
    assert redact_url("sqlite:///tasks.db") == "sqlite:///tasks.db"


def test_mysql_connect_failure_hides_password() -> None:
    # Port 1 on loopback has no server, so the connection is refused at once.
    with pytest.raises(StoreError, match="cannot connect") as caught:
        open_store("mysql://alice:secret@127.0.0.1:1/tasks")
    assert "***" in str(caught.value)
    assert "secret" not in str(caught.value)


def test_list_created_range(store: Store) -> None:
    store.write_batch([make_task(f"t{index}", created_at=BASE_TIME + index) for index in range(10)], [])

    def ids(**filters: object) -> list[str]:
        return [row["id"] for row in store.list_tasks(**filters)]

    # created_from is inclusive and created_until exclusive, to the microsecond.
    assert ids(created_from=BASE_TIME + 3, created_until=BASE_TIME + 7) == ["t6", "t5", "t4", "t3"]
    assert ids(created_from=BASE_TIME + 3.000001, created_until=BASE_TIME + 7.000001) == ["t7", "t6", "t5", "t4"]
    assert ids(created_from=BASE_TIME + 8) == ["t9", "t8"]
    assert ids(created_until=BASE_TIME + 2) == ["t1", "t0"]
    assert ids(created_from=BASE_TIME + 5, created_until=BASE_TIME + 5) == []


def test_list_created_range_with_filters_and_pages(store: Store) -> None:
    tasks = [
        make_task(f"t{index:02d}", status="failed" if index % 2 else "completed", created_at=BASE_TIME + index // 2)
        for index in range(20)
    ]
    store.write_batch(tasks, [])

    seen: list[str] = []
    cursor = None
    while True:
        page = store.list_tasks(
            status="failed", created_from=BASE_TIME + 2, created_until=BASE_TIME + 8, limit=2, before=cursor
        )
        if not page:
            break
        seen.extend(row["id"] for row in page)
        cursor = store.cursor_for(page[-1])

    # Failed tasks have odd numbers, and task n was created at BASE_TIME + n // 2.
    assert seen == ["t15", "t13", "t11", "t09", "t07", "t05"]


def test_list_created_range_invalid(store: Store) -> None:
    with pytest.raises(StoreError, match="invalid created_from nan"):
        store.list_tasks(created_from=math.nan)
    with pytest.raises(StoreError, match="invalid created_until inf"):
        store.list_tasks(created_until=math.inf)


def test_count_by_provider_status(store: Store) -> None:
    assert store.count_by_provider_status() == {}

    store.write_batch(
        [
            make_task("a", provider_id="hetzner", status="running"),
            make_task("b", provider_id="hetzner", status="running"),
            make_task("c", provider_id="hetzner", status="cancelled"),
            make_task("d", provider_id="ovh", status="failed"),
            make_task("e", provider_id="ovh", status="completed"),
        ],
        [],
    )

    assert store.count_by_provider_status() == {
        "hetzner": {"running": 2, "cancelled": 1},
        "ovh": {"failed": 1, "completed": 1},
    }


def finished_task(task_id: str, status: str, started: float | None, completed: float, **changes: object) -> TaskRecord:
    return make_task(
        task_id, version=3, status=status, started_at=started, completed_at=completed, updated_at=completed, **changes
    )


def test_run_durations(store: Store) -> None:
    since = BASE_TIME + 1000
    store.write_batch(
        [
            finished_task("start-1", "completed", since + 10, since + 12.5, task_type="start"),
            finished_task("start-2", "completed", since + 20, since + 27.25, task_type="start"),
            finished_task("create-1", "completed", since - 100, since + 200, task_type="create"),
            # Completed at exactly `since`: included.
            finished_task("stop-1", "completed", since - 4, since, task_type="stop"),
            # Completed before `since`, not completed, or never started: excluded.
            finished_task("start-old", "completed", since - 60, since - 0.000001, task_type="start"),
            finished_task("start-failed", "failed", since + 1, since + 50, task_type="start"),
            finished_task("start-cancelled", "cancelled", None, since + 60, task_type="start"),
            make_task("start-running", status="running", started_at=since + 5, task_type="start"),
        ],
        [],
    )

    durations = store.run_durations(since)

    assert set(durations) == {"start", "create", "stop"}
    assert durations["start"] == pytest.approx([7.25, 2.5], abs=1e-6)
    assert durations["create"] == pytest.approx([300.0], abs=1e-6)
    assert durations["stop"] == pytest.approx([4.0], abs=1e-6)


def test_run_durations_limit_keeps_newest(store: Store) -> None:
    since = BASE_TIME
    store.write_batch(
        [
            finished_task(f"t{index}", "completed", since + index * 10, since + index * 10 + index,
                          task_type="start" if index % 2 else "stop")
            for index in range(1, 7)
        ],
        [],
    )  # fmt: skip

    durations = store.run_durations(since, limit=3)

    # The three newest completions are t6, t5 and t4, and task n ran for n seconds.
    assert durations["stop"] == pytest.approx([6.0, 4.0], abs=1e-6)
    assert durations["start"] == pytest.approx([5.0], abs=1e-6)
    with pytest.raises(ValueError, match="at least 1"):
        store.run_durations(since, limit=0)
    assert store.run_durations(since + 1000) == {}


def test_error_rate(store: Store) -> None:
    since = BASE_TIME + 3600
    assert store.error_rate(since) == (0, 0, 0)

    store.write_batch(
        [
            finished_task("ok-1", "completed", since, since + 1),
            finished_task("ok-2", "completed", since, since + 2),
            finished_task("failed-1", "failed", since, since + 3),
            finished_task("timeout-1", "timeout", since, since + 4),
            finished_task("cancelled-1", "cancelled", None, since + 5),
            finished_task("cancelled-2", "cancelled", since, since),
            finished_task("rejected-1", "failed", None, since + 2, error_message="rejected: field 'user' is missing"),
            # Ended before `since`, or not ended: not counted.
            finished_task("failed-old", "failed", since - 10, since - 1),
            finished_task("completed-old", "completed", since - 10, since - 1),
            make_task("running-1", status="running", started_at=since + 1),
            make_task("pending-1", status="pending"),
        ],
        [],
    )

    errors, terminal, rejected = store.error_rate(since)
    assert errors == 2
    assert terminal == 6
    assert rejected == 1
    assert store.error_rate(since + 4.5) == (0, 1, 0)


def test_mysql_unanswered_server_times_out() -> None:
    from shared.store.mysql import MysqlStore

    # A listening socket that never accepts: the kernel completes the TCP handshake for
    # queued connections, so the client is connected but never gets the server greeting.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        port = listener.getsockname()[1]
        url = f"mysql://alice:secret@127.0.0.1:{port}/tasks"

        started = time.monotonic()
        with pytest.raises(StoreError) as caught:
            store = MysqlStore(
                host="127.0.0.1", port=port, user="alice", password="secret", database="tasks",
                display_url=redact_url(url), io_timeout_seconds=1,
            )  # fmt: skip
            store.init_schema()
        elapsed = time.monotonic() - started

    message = str(caught.value)
    assert elapsed < 10
    assert f"mysql://alice:***@127.0.0.1:{port}/tasks" in message
    assert "secret" not in message
    assert "cannot connect" in message
    assert "no reply from the server within 1 s" in message
    assert f"MySQL or MariaDB server is listening on 127.0.0.1:{port}" in message
    assert "user 'alice' may connect" in message


def test_mariadb_query_timeout_names_server(mariadb_url: str, caplog: pytest.LogCaptureFixture) -> None:
    from shared.store.mysql import MysqlStore

    parts = urlsplit(mariadb_url)
    database = parts.path[1:]
    # Another session holds the schema lock, so init_schema's GET_LOCK gets no reply
    # within the 1 s read timeout, once on the first connection and once after reconnecting.
    holder = pymysql.connect(
        host=parts.hostname, port=parts.port, user=unquote(parts.username or ""),
        password=unquote(parts.password or ""), database=database, autocommit=True,
    )  # fmt: skip
    try:
        with holder.cursor() as cursor:
            cursor.execute("SELECT GET_LOCK(CONCAT('taskvisor_schema.', DATABASE()), 0)")
            assert cursor.fetchone() == (1,)

        store = MysqlStore(
            host=parts.hostname, port=parts.port, user=unquote(parts.username or ""),
            password=unquote(parts.password or ""), database=database,
            display_url=redact_url(mariadb_url), io_timeout_seconds=1,
        )  # fmt: skip
        started = time.monotonic()
        with store, pytest.raises(StoreError) as caught:
            store.init_schema()
        elapsed = time.monotonic() - started
    finally:
        holder.close()

    message = str(caught.value)
    assert elapsed < 10
    assert message.startswith(f"creating the schema on {redact_url(mariadb_url)} failed")
    assert "no reply from the server within 1 s" in message
    assert f"listening on {parts.hostname}:{parts.port}" in message
    assert "reconnecting" in caplog.text


def test_mariadb_unknown_database_hint(mariadb_url: str) -> None:
    missing_url = f"{mariadb_url}_missing"

    with pytest.raises(StoreError) as caught:
        open_store(missing_url)

    message = str(caught.value)
    assert message.startswith(f"cannot connect to {redact_url(missing_url)}")
    assert "1049" in message
    assert "create the database first or fix its name in the URL" in message
