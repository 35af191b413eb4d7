"""The main job end to end: redis-cli producers, a real supervisor, Redis and SQL."""

import signal

import pytest

from shared.store import open_store
from tests.fixtures_redis import have_redis_cli
from tests.harness import command_provider, redis_cli_xadd, task_hash, wait_for, write_script

TERMINAL = {"completed", "failed", "timeout", "cancelled"}


def max_overlap(rows: list[dict]) -> int:
    """Return the largest number of tasks whose [started_at, completed_at] intervals overlap."""
    points = []
    for row in rows:
        points.append((row["started_at"], 1))
        points.append((row["completed_at"], -1))
    points.sort(key=lambda point: (point[0], point[1]))
    running = peak = 0
    for _time, step in points:
        running += step
        peak = max(peak, running)
    return peak


def sql_rows(database_url: str, provider: str) -> list[dict]:
    store = open_store(database_url)
    try:
        return store.list_tasks(provider=provider, limit=500)
    finally:
        store.close()


@pytest.fixture
def operation_script(tmp_path):
    return write_script(
        tmp_path / "operation.sh",
        'cat >/dev/null\necho "progress 50 working on $2"\nsleep "${SLEEP:-0.3}"\necho "{\\"done\\": \\"$1\\"}"\n',
    )


def test_redis_cli_batch_reaches_sql(store_url, redis_server, start_supervisor, operation_script):
    have_redis_cli()
    providers = {"serial": command_provider(operation_script), "pool": command_provider(operation_script, concurrent=3)}
    supervisor = start_supervisor(providers, database_url=store_url)
    ids = {"serial": [], "pool": []}
    for index in range(6):
        redis_cli_xadd(redis_server.port, "taskvisor:{serial}:tasks",
                       {"id": f"s-{index}", "type": "start", "instance": f"vm-{index}", "user": "alice"})
    for index in range(12):
        redis_cli_xadd(redis_server.port, "taskvisor:{pool}:tasks",
                       {"id": f"p-{index}", "type": "restart", "instance": f"vm-{index}", "user": "bob"})
    ids["serial"] = [f"s-{index}" for index in range(6)]
    ids["pool"] = [f"p-{index}" for index in range(12)]
    client = redis_server.client()

    def all_done() -> bool:
        return all(task_hash(client, p, t).get("status") == "completed" for p, group in ids.items() for t in group)

    wait_for(all_done, 30, "every task to complete in Redis")
    wait_for(lambda: len([r for r in sql_rows(store_url, "serial") if r["status"] == "completed"]) == 6, 10,
             "6 completed serial rows in SQL")
    wait_for(lambda: len([r for r in sql_rows(store_url, "pool") if r["status"] == "completed"]) == 12, 10,
             "12 completed pool rows in SQL")

    serial_rows = sql_rows(store_url, "serial")
    pool_rows = sql_rows(store_url, "pool")
    assert max_overlap(serial_rows) == 1
    assert max_overlap(pool_rows) == 3
    assert {row["result"] for row in serial_rows} == {'{"done":"start"}'}
    assert all(row["progress"] == 100 for row in pool_rows)
    assert all(row["attempts"] == 1 for row in serial_rows + pool_rows)
    store = open_store(store_url)
    assert store.get_instance("pool", "vm-3")["status"] == "running"
    store.close()
    assert supervisor.stop() == 0


def test_pending_visible_while_workers_busy(sqlite_url, redis_server, start_supervisor, tmp_path):
    slow = write_script(tmp_path / "slow.sh", "cat >/dev/null\nsleep 3\n")
    start_supervisor({"serial": command_provider(slow)}, database_url=sqlite_url)
    client = redis_server.client()
    client.xadd("taskvisor:{serial}:tasks", {"id": "first", "type": "start", "instance": "vm-1", "user": "u"})
    wait_for(lambda: task_hash(client, "serial", "first").get("status") == "running", 10, "the first task to run")

    client.xadd("taskvisor:{serial}:tasks", {"id": "second", "type": "stop", "instance": "vm-2", "user": "u"})
    wait_for(lambda: task_hash(client, "serial", "second").get("status") == "pending", 1.0, "pending in Redis")
    wait_for(lambda: any(r["id"] == "second" and r["status"] == "pending" for r in sql_rows(sqlite_url, "serial")),
             1.0, "pending in SQL")


def test_timeout_kills_process_group(sqlite_url, redis_server, start_supervisor, tmp_path, operation_script):
    import psutil

    pids = tmp_path / "pids"
    stubborn = write_script(
        tmp_path / "stubborn.sh",
        f"trap '' TERM\nsleep 600 &\necho \"$$ $!\" > {pids}\nwhile true; do sleep 1; done\n",
    )
    provider = command_provider(stubborn, timeouts={"start": 1}, kill_grace=0.5)
    provider["driver"]["commands"]["stop"] = [operation_script, "stop", "{instance}"]
    start_supervisor({"p": provider}, database_url=sqlite_url)
    client = redis_server.client()
    client.xadd("taskvisor:{p}:tasks", {"id": "stuck", "type": "start", "instance": "vm-1", "user": "u"})
    client.xadd("taskvisor:{p}:tasks", {"id": "after", "type": "stop", "instance": "vm-2", "user": "u"})

    wait_for(lambda: task_hash(client, "p", "stuck").get("status") == "timeout", 15, "the timeout")
    shell_pid, child_pid = (int(pid) for pid in wait_for(pids.read_text, 1, "the pid file").split())
    for pid in (shell_pid, child_pid):
        wait_for(lambda pid=pid: not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE,
                 5, f"process {pid} to be killed")
    assert task_hash(client, "p", "stuck")["error"].startswith("timed out after 1 s")
    wait_for(lambda: task_hash(client, "p", "after").get("status") == "completed", 10, "the next task to complete")
    assert task_hash(client, "p", "stuck")["attempts"] == "1"


@pytest.mark.parametrize(
    ("task_type", "before", "expected"),
    [
        ("create", None, "error"),
        ("start", "stopped", "stopped"),
        ("stop", "running", "running"),
        ("restart", "running", "running"),
        ("delete", "stopped", "stopped"),
        ("reset", "running", "running"),
    ],
)
def test_failure_sets_instance_status(sqlite_url, redis_server, start_supervisor, tmp_path, task_type, before, expected):
    script = write_script(
        tmp_path / "flaky.sh",
        'cat >/dev/null\nif [ "$3" = fail ]; then echo "disk image missing for $2" >&2; exit 7; fi\necho "{}"\n',
    )
    start_supervisor({"p": command_provider(script)}, database_url=sqlite_url)
    client = redis_server.client()
    stream = "taskvisor:{p}:tasks"
    if before is not None:
        setup_type = {"stopped": "stop", "running": "start"}[before]
        client.xadd(stream, {"id": "setup", "type": setup_type, "instance": "vm-1", "user": "u"})
    client.xadd(stream, {"id": "fail", "type": task_type, "instance": "vm-1", "user": "u"})

    wait_for(lambda: task_hash(client, "p", "fail").get("status") in TERMINAL, 15, "the failing task to end")
    failed = task_hash(client, "p", "fail")
    assert failed["status"] == "failed"
    assert failed["error"] == "command exited with status 7: disk image missing for vm-1"
    assert client.hget("taskvisor:{p}:instances", "vm-1").decode() == expected

    def sql_rows():
        store = open_store(sqlite_url)
        try:
            return store.get_task("fail") or {}, store.get_instance("p", "vm-1") or {}
        finally:
            store.close()

    # The instance change is in the same event as the task's end, so the mirror writes
    # both in one transaction.
    wait_for(lambda: sql_rows()[0].get("status") == "failed", 5, "the failed task's row")
    instance_row = sql_rows()[1]
    assert instance_row["last_task_id"] == "fail"
    assert instance_row["status"] == expected


INVALID_ENTRIES = [
    ({"instance": "vm-1", "user": "u"}, "field 'type' is missing"),
    ({"type": "boot", "instance": "vm-1", "user": "u"}, "field 'type' has unknown value 'boot'"),
    ({"type": "start", "user": "u"}, "field 'instance' is missing"),
    ({"type": "start", "instance": "vm-1"}, "field 'user' is missing"),
    ({"id": "bad id!", "type": "start", "instance": "vm-1", "user": "u"}, "field 'id' has invalid value 'bad id!'"),
    ({"type": "start", "instance": "vm-1", "user": "u", "data": "{oops"}, "field 'data' is not valid JSON"),
    ({"type": "start", "instance": "vm-1", "user": "u", "data": "[1, 2]"}, "field 'data' must be a JSON object"),
    ({"type": "start", "instance": "vm-1", "user": "u", "timeout": "soon"}, "field 'timeout' has invalid value 'soon'"),
    ({"type": "start", "instance": "vm-1", "user": "u", "timeout": "-5"}, "expected a positive number of seconds"),
    ({"type": "start", "instance": "vm-1", "user": "u", "timeout": "nan"}, "expected a positive number of seconds"),
    ({"type": "start", "instance": b"vm-\xff", "user": "u"}, "field 'instance' is not valid UTF-8"),
    ({"id": "valid-0", "type": "stop", "instance": "vm-2", "user": "u"}, "duplicate task id 'valid-0'"),
]


def test_invalid_entries_dead_lettered(sqlite_url, redis_server, start_supervisor, operation_script):
    client = redis_server.client()
    stream = "taskvisor:{p}:tasks"
    client.xadd(stream, {"id": "valid-0", "type": "start", "instance": "vm-0", "user": "u"})
    for index, (fields, _reason) in enumerate(INVALID_ENTRIES):
        client.xadd(stream, fields)
        client.xadd(stream, {"id": f"valid-{index + 1}", "type": "start", "instance": f"vm-{index}", "user": "u"})
    start_supervisor({"p": command_provider(operation_script, concurrent=2)}, database_url=sqlite_url)
    valid_count = len(INVALID_ENTRIES) + 1

    wait_for(lambda: client.xlen("taskvisor:{p}:dead") == len(INVALID_ENTRIES), 20, "every invalid entry in the dead-letter stream")
    reasons = [fields[b"reason"].decode() for _id, fields in client.xrange("taskvisor:{p}:dead")]
    for _fields, expected in INVALID_ENTRIES:
        assert any(expected in reason for reason in reasons), f"no dead letter says {expected!r}: {reasons}"
    wait_for(
        lambda: all(task_hash(client, "p", f"valid-{i}").get("status") == "completed" for i in range(valid_count)),
        30, "every valid task to complete",
    )  # fmt: skip
    assert task_hash(client, "p", "valid-0")["instance"] == "vm-0"
    wait_for(lambda: client.xlen(stream) == 0, 5, "the task stream to be emptied of handled entries")
    pending = client.xpending(stream, "workers")
    assert pending["pending"] == 0


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGKILL])
def test_restart_mid_batch_loses_nothing(sqlite_url, redis_server, start_supervisor, tmp_path, stop_signal):
    runs = tmp_path / "runs.log"
    script = write_script(tmp_path / "op.sh", f'cat >/dev/null\necho "$3" >> {runs}\nsleep 0.4\necho "{{}}"\n')
    providers = {"serial": command_provider(script), "pool": command_provider(script, concurrent=3)}
    first = start_supervisor(providers, shutdownGrace=0.1, database_url=sqlite_url)
    client = redis_server.client()
    ids = []
    for index in range(10):
        for provider in providers:
            task_id = f"{provider}-{index}"
            client.xadd(f"taskvisor:{{{provider}}}:tasks", {"id": task_id, "type": "start", "instance": f"vm-{index}", "user": "u"})
            ids.append((provider, task_id))
    wait_for(lambda: runs.exists() and len(runs.read_text().split()) >= 4, 15, "some tasks to start")

    if stop_signal == signal.SIGKILL:
        first.process.kill()
        first.process.wait(10)
    else:
        assert first.stop(signal.SIGTERM) == 0
        assert "grace period over; stopping running tasks and returning them to pending" in first.log()
    second = start_supervisor(providers, database_url=sqlite_url)

    def all_completed() -> bool:
        return all(task_hash(client, provider, task_id).get("status") == "completed" for provider, task_id in ids)

    wait_for(all_completed, 60, "every task of the batch to complete after the restart")
    wait_for(lambda: len([r for r in sql_rows(sqlite_url, "serial") + sql_rows(sqlite_url, "pool")
                          if r["status"] == "completed"]) == 20, 10, "20 completed rows in SQL")
    started = set(runs.read_text().split())
    assert started == {task_id for _provider, task_id in ids}
    assert client.xlen("taskvisor:{serial}:tasks") == 0
    assert second.stop() == 0


def test_killed_worker_is_replaced(sqlite_url, redis_server, start_supervisor, tmp_path):
    import os

    import psutil

    runs = tmp_path / "runs.log"
    script = write_script(tmp_path / "op.sh", f'cat >/dev/null\necho "$3 $$" >> {runs}\nsleep 4\necho "{{}}"\n')
    supervisor = start_supervisor({"p": command_provider(script)}, database_url=sqlite_url)
    client = redis_server.client()
    client.xadd("taskvisor:{p}:tasks", {"id": "victim", "type": "restart", "instance": "vm-1", "user": "u"})
    client.xadd("taskvisor:{p}:tasks", {"id": "behind", "type": "restart", "instance": "vm-2", "user": "u"})
    wait_for(lambda: task_hash(client, "p", "victim").get("status") == "running", 10, "the first task to run")
    worker_pid = int(task_hash(client, "p", "victim")["owner"].rsplit(":", 1)[1])
    command_pid = int(wait_for(lambda: runs.exists() and runs.read_text().split(), 5, "the command to start")[1])

    os.kill(worker_pid, signal.SIGKILL)
    wait_for(lambda: not psutil.pid_exists(command_pid) or psutil.Process(command_pid).status() == psutil.STATUS_ZOMBIE,
             3, "the dead worker's command to be killed")
    wait_for(lambda: task_hash(client, "p", "victim").get("status") == "completed", 30, "the task to be run again")
    wait_for(lambda: task_hash(client, "p", "behind").get("status") == "completed", 30, "the next task")
    victim = task_hash(client, "p", "victim")
    assert victim["attempts"] == "2"
    assert int(victim["owner"].rsplit(":", 1)[1]) != worker_pid
    log = supervisor.log()
    assert f"child killed by signal SIGKILL role=worker provider=p slot=0 pid={worker_pid}" in log
    assert f"killed process left by a dead worker pid={command_pid}" in log
    assert sorted(line.split()[0] for line in runs.read_text().splitlines()) == ["behind", "victim", "victim"]


def test_abandoned_entry_claimed_after_rename(sqlite_url, redis_server, start_supervisor, tmp_path, operation_script):
    client = redis_server.client()
    stream = "taskvisor:{p}:tasks"
    client.xgroup_create(stream, "workers", id="0", mkstream=True)
    client.xadd(stream, {"id": "orphan", "type": "start", "instance": "vm-1", "user": "u"})
    # A consumer of a supervisor that ran under another name took the entry and vanished.
    client.xreadgroup("workers", "old-host-p-0", {stream: ">"}, count=1)

    start_supervisor({"p": command_provider(operation_script)}, database_url=sqlite_url)
    wait_for(lambda: task_hash(client, "p", "orphan").get("status") == "completed", 20, "the orphaned entry to run")
    assert client.xpending(stream, "workers")["pending"] == 0
