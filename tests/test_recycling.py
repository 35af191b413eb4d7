"""Worker recycling: maxTasksPerWorker and maxWorkerMemoryMB replace a worker between tasks."""

import re
import time
from collections import Counter

import orjson
import pytest

from shared.errors import ConfigError
from shared.heartbeat import HeartbeatTable
from shared.provider_settings import merge_provider, parse_value
from shared.settings import parse_config
from supervisor.monitor import Monitor, describe_exit
from tests.harness import command_provider, task_hash, wait_for, write_script
from worker.main import EXIT_RECYCLE_MEMORY

FINAL = ("completed", "failed", "timeout", "cancelled")


def owner_pid(task: dict[str, str]) -> int:
    return int(task["owner"].rpartition(":")[2])


def all_ended(client, provider: str, task_ids: list[str]) -> list[dict[str, str]] | None:
    tasks = [task_hash(client, provider, task_id) for task_id in task_ids]
    return tasks if all(task.get("status") in FINAL for task in tasks) else None


def test_max_tasks_per_worker_recycles(start_supervisor, redis_server, tmp_path):
    script = write_script(tmp_path / "op.sh", 'cat >/dev/null\nsleep 0.05\necho "{}"\n')
    provider = {**command_provider(script), "maxTasksPerWorker": 3}
    supervisor = start_supervisor({"p": provider})
    client = redis_server.client()
    task_ids = [f"t-{n}" for n in range(7)]
    for n, task_id in enumerate(task_ids):
        client.xadd("taskvisor:{p}:tasks", {"id": task_id, "type": "start", "instance": f"vm-{n}", "user": "u"})

    tasks = wait_for(lambda: all_ended(client, "p", task_ids), 30, "all seven tasks to end")
    assert [task["status"] for task in tasks] == ["completed"] * 7
    per_pid = Counter(owner_pid(task) for task in tasks)
    assert sorted(per_pid.values()) == [1, 3, 3], per_pid
    # One worker at a time runs the serial provider, so the pids follow in stream order.
    assert [owner_pid(task) for task in tasks] == sorted(owner_pid(task) for task in tasks)

    log = supervisor.log()
    recycled = re.findall(r"worker recycled after reaching its maxTasksPerWorker limit; replacing it at once .*", log)
    assert len(recycled) == 2, log
    assert len(re.findall(r"reason=maxTasksPerWorker tasks_done=3 limit=3", log)) == 2
    assert "respawn delayed" not in log
    assert "child exited with code" not in log


def test_memory_limit_recycles_between_tasks(start_supervisor, redis_server):
    provider = {"driver": {"type": "tests.recycling_drivers:HoardingDriver"}, "maxWorkerMemoryMB": 128}
    supervisor = start_supervisor({"p": provider})
    client = redis_server.client()
    pushed = (("m-1", 0), ("m-2", 200), ("m-3", 0))
    for task_id, megabytes in pushed:
        data = orjson.dumps({"allocate_mb": megabytes}).decode()
        client.xadd("taskvisor:{p}:tasks", {"id": task_id, "type": "start", "instance": "vm-1", "user": "u", "data": data})

    tasks = wait_for(lambda: all_ended(client, "p", [task_id for task_id, _ in pushed]), 30, "the three tasks to end")
    assert [task["status"] for task in tasks] == ["completed"] * 3
    first, second, third = (owner_pid(task) for task in tasks)
    assert first == second, "the worker under its limit must keep running"
    assert third != second, "the worker over its limit must be replaced before the next task"

    log = supervisor.log()
    assert re.search(rf"worker recycling provider=p pid={second} reason=maxWorkerMemoryMB rss_mb=\d+ limit_mb=128", log), log
    assert f"worker recycled after reaching its maxWorkerMemoryMB limit; replacing it at once role=worker provider=p slot=0 pid={second}" in log
    assert "respawn delayed" not in log


def provider_document(**settings) -> dict:
    return {"providers": {"p": {"driver": {"type": "command", "commands": {"start": ["true"]}}, **settings}}}


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"maxTasksPerWorker": -1}, "invalid value at providers.p.maxTasksPerWorker (value -1): expected an integer of at least 0"),
        ({"maxTasksPerWorker": "3"}, "invalid value at providers.p.maxTasksPerWorker (value '3'): expected an integer, got a string"),
        ({"maxWorkerMemoryMB": 32}, "invalid value at providers.p.maxWorkerMemoryMB (value 32): expected 0 (no limit) or at least 64"),
        ({"maxWorkerMemoryMB": 2**21}, "expected an integer of at most 1048576"),
        ({"maxWorkerMemoryMb": 100}, "unknown key 'maxWorkerMemoryMb' under providers.p; did you mean 'maxWorkerMemoryMB'?"),
    ],
)
def test_recycling_settings_rejected(settings, message):
    with pytest.raises(ConfigError) as error:
        parse_config(provider_document(**settings), "test.yaml", ".")
    assert message in str(error.value)


def test_recycling_settings_in_redis():
    settings = parse_config(provider_document(), "test.yaml", ".").providers["p"]
    assert (settings.max_tasks_per_worker, settings.max_worker_memory_mb) == (0, 0)

    override = {"maxTasksPerWorker": parse_value("maxTasksPerWorker", "100"), "maxWorkerMemoryMB": parse_value("maxWorkerMemoryMB", "512")}
    merged = merge_provider("p", provider_document()["providers"]["p"], override)
    assert (merged.max_tasks_per_worker, merged.max_worker_memory_mb) == (100, 512)
    with pytest.raises(ConfigError, match="maxWorkerMemoryMB"):
        merge_provider("p", provider_document()["providers"]["p"], {"maxWorkerMemoryMB": 10})


def test_recycle_exit_keeps_readiness(redis_server, tmp_path):
    config = parse_config({"redis": {"url": redis_server.url}}, "test", str(tmp_path))
    table = HeartbeatTable(slot_count=4)
    monitor = Monitor(config, table)
    try:
        recycled = table.assign("worker", "p", 0)
        table.set_pid(recycled, 1001)
        table.release(recycled, EXIT_RECYCLE_MEMORY << 8, exit_requested=False)
        crashed = table.assign("worker", "p", 1)
        table.set_pid(crashed, 1002)
        table.release(crashed, 1 << 8, exit_requested=False)

        reasons = monitor.child_reasons(table.read_all(), {}, time.monotonic())
        assert not any("pid 1001" in reason for reason in reasons), reasons
        assert any("worker p/1 pid 1002 exited with code 1" in reason for reason in reasons), reasons
        assert describe_exit(table.read_slot(recycled)) == "recycled after reaching its maxWorkerMemoryMB limit"
    finally:
        monitor.close()
