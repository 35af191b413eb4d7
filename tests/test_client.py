"""shared.client.TaskvisorClient against a private Redis and, where it matters, a live supervisor."""

import json

import orjson
import pytest

from shared.client import (
    CancelRejected,
    DuplicateTaskId,
    InvalidTask,
    TaskNotFound,
    TaskvisorClient,
    WaitTimeout,
)
from tests.harness import command_provider, wait_for, write_script

# Instances named slow-* run for 30 s, fail-* fail, and the others report progress and complete.
OPERATION = """\
cat >/dev/null
case "$2" in
  slow-*) echo "progress 10 started $2"; sleep 30 ;;
  fail-*) echo "disk image missing" >&2; exit 3 ;;
esac
echo "progress 50 working on $2"
sleep 0.2
echo "{\\"done\\": \\"$1\\"}"
"""


def status_of(client: TaskvisorClient, provider: str, task_id: str) -> str | None:
    try:
        return client.get(provider, task_id).status
    except TaskNotFound:
        return None


@pytest.fixture
def provider_settings(tmp_path):
    return command_provider(write_script(tmp_path / "operation.sh", OPERATION), concurrent=2)


@pytest.fixture
def client(redis_server):
    return TaskvisorClient.from_url(redis_server.url)


@pytest.fixture
def supervisor(start_supervisor, provider_settings):
    return start_supervisor({"p": provider_settings})


def test_submit_writes_contract_fields(client, redis_server):
    task_id = client.submit(
        "p", "reset-password", user="17", instance="vm-1", data={"username": "root", "password": "pw"},
        timeout=2.5, task_id="t-1", extra_fields={"request_id": "r-9"},
    )  # fmt: skip

    assert task_id == "t-1"
    (_entry_id, fields), = redis_server.client().xrange("taskvisor:{p}:tasks")
    sent = {name.decode(): value.decode() for name, value in fields.items()}
    assert sent["v"] == "1"
    assert sent["type"] == "reset-password"
    assert sent["instance"] == "vm-1"
    assert sent["user"] == "17"
    assert sent["timeout"] == "2.5"
    assert json.loads(sent["data"]) == {"username": "root", "password": "pw"}
    assert sent["request_id"] == "r-9"


def test_submit_derives_task_id(client, redis_server):
    task_id = client.submit("p", "create", user="17")

    (entry_id, _fields), = redis_server.client().xrange("taskvisor:{p}:tasks")
    assert task_id == f"p:{entry_id.decode()}"


def test_submit_writes_whole_seconds_plainly(client, redis_server):
    client.submit("p", "start", user="u", instance="vm-1", timeout=60)

    (_entry_id, fields), = redis_server.client().xrange("taskvisor:{p}:tasks")
    assert fields[b"timeout"] == b"60"


INVALID_TASKS = [
    ({"provider": "p{1}"}, "provider", "provider 'p{1}' is invalid"),
    ({"task_type": "reboot"}, "type", "field 'type' has unknown value 'reboot'"),
    ({"instance": ""}, "instance", "field 'instance' is missing: it is required for a 'start' task"),
    ({"instance": "vm 1"}, "instance", "field 'instance' has invalid value 'vm 1'"),
    ({"user": ""}, "user", "field 'user' is missing"),
    ({"task_id": "a/b"}, "id", "field 'id' has invalid value 'a/b'"),
    ({"timeout": 0}, "timeout", "expected a positive number of seconds"),
    ({"timeout": 604801}, "timeout", "at most 604800 seconds (7 days) is allowed"),
    ({"timeout": "1e3"}, "timeout", "field 'timeout' has invalid value '1e3'"),
    ({"timeout": True}, "timeout", "field 'timeout' has invalid value True"),
    ({"data": {"blob": "x" * 70000}}, "data", "field 'data' is larger than the limit of 65536 bytes"),
    ({"data": {"when": object()}}, "data", "field 'data' cannot be encoded as JSON"),
    ({"extra_fields": {"type": "stop"}}, "type", "field 'type' is part of the contract"),
]


@pytest.mark.parametrize(("change", "field", "reason"), INVALID_TASKS, ids=[case[1] + "-" + str(i) for i, case in enumerate(INVALID_TASKS)])
def test_submit_rejects_invalid_task(client, redis_server, change, field, reason):
    arguments = {"provider": "p", "task_type": "start", "user": "u", "instance": "vm-1", **change}
    provider = arguments.pop("provider")
    task_type = arguments.pop("task_type")

    with pytest.raises(InvalidTask) as caught:
        client.submit(provider, task_type, **arguments)

    assert caught.value.field == field
    assert reason in caught.value.reason
    assert str(caught.value).startswith("task not submitted: ")
    assert redis_server.client().xlen("taskvisor:{p}:tasks") == 0


def test_get_unknown_task_raises(client):
    with pytest.raises(TaskNotFound) as caught:
        client.get("p", "nope")

    assert "task 'nope' not found for provider 'p'" in str(caught.value)
    assert client.locate("nope") is None


def test_wait_returns_completed_task(client, supervisor):
    task_id = client.submit("p", "start", user="u", instance="vm-1", task_id="t-ok")

    task = client.wait("p", task_id, timeout=15)

    assert task.status == "completed"
    assert task.finished
    assert task.progress == 100
    assert orjson.loads(task.result) == {"done": "start"}
    assert task.attempts == 1
    assert task.started_at is not None and task.completed_at >= task.started_at
    assert client.get("p", task_id).version == task.version
    assert client.locate(task_id) == "p"


def test_wait_returns_failed_task(client, supervisor):
    task_id = client.submit("p", "stop", user="u", instance="fail-1")

    task = client.wait("p", task_id, timeout=15)

    assert task.status == "failed"
    assert "disk image missing" in task.error


def test_follow_yields_every_change_in_order(client, supervisor):
    task_id = client.submit("p", "restart", user="u", instance="vm-2")

    changes = list(client.follow("p", task_id, timeout=15))

    statuses = [task.status for task in changes]
    assert statuses[0] in ("pending", "running")
    assert statuses[-1] == "completed"
    assert "running" in statuses
    versions = [task.version for task in changes]
    assert versions == list(range(versions[0], versions[0] + len(versions)))
    assert any(task.progress == 50 and task.message == "working on vm-2" for task in changes)


def test_wait_timeout_reports_last_state(client, supervisor):
    task_id = client.submit("p", "start", user="u", instance="slow-1")
    wait_for(lambda: status_of(client, "p", task_id) == "running", 10, "the slow task to run")

    with pytest.raises(WaitTimeout) as caught:
        client.wait("p", task_id, timeout=0.5)

    assert caught.value.task is not None
    assert caught.value.task.status == "running"
    assert f"task '{task_id}' did not end within 0.5 s: still running" == str(caught.value)


def test_submit_rejects_used_task_id(client, supervisor):
    client.submit("p", "start", user="u", instance="vm-1", task_id="once")
    client.wait("p", "once", timeout=15)

    with pytest.raises(DuplicateTaskId) as caught:
        client.submit("p", "stop", user="u", instance="vm-1", task_id="once")

    assert caught.value.field == "id"
    assert "task id 'once' is already used by entry p " in caught.value.reason


def test_cancel_running_task(client, supervisor):
    task_id = client.submit("p", "start", user="alice", instance="slow-2")
    wait_for(lambda: status_of(client, "p", task_id) == "running", 10, "the slow task to run")

    accepted = client.cancel("p", task_id, user="alice", reason="changed plan")
    final = client.wait("p", task_id, timeout=10)

    assert accepted.status in ("cancelling", "cancelled")
    assert accepted.cancelled_by == "alice"
    assert accepted.cancel_reason == "changed plan"
    assert final.status == "cancelled"


def test_cancel_pending_task(client, supervisor):
    first = client.submit("p", "start", user="alice", instance="slow-3")
    queued = client.submit("p", "stop", user="alice", instance="slow-3")
    wait_for(lambda: status_of(client, "p", queued) == "pending", 10, "the queued task to be registered")
    wait_for(lambda: status_of(client, "p", first) == "running", 10, "the first task to run")

    task = client.cancel("p", queued)

    assert task.status == "cancelled"
    assert task.message == "cancelled before it started"
    assert task.cancelled_by == "admin"
    assert client.get("p", first).status == "running"


def test_cancel_other_users_task_rejected(client, supervisor):
    task_id = client.submit("p", "start", user="alice", instance="slow-4")
    wait_for(lambda: status_of(client, "p", task_id), 10, "the task to be registered")

    with pytest.raises(CancelRejected) as caught:
        client.cancel("p", task_id, user="mallory")

    assert caught.value.reason == "user mallory may not cancel a task of user alice; nothing was changed"
    task = client.get("p", task_id)
    assert task.status in ("pending", "running")
    assert "cancel_request_user" not in task.fields


def test_cancel_finished_task_rejected(client, supervisor):
    task_id = client.submit("p", "start", user="u", instance="vm-5")
    client.wait("p", task_id, timeout=15)

    with pytest.raises(CancelRejected) as caught:
        client.cancel("p", task_id)

    assert caught.value.reason == "the task had already ended as completed; nothing was changed"


def test_cancel_before_registration_is_stored(client, redis_server):
    result = client.cancel("p", "later-1", user="u", reason="too late")

    assert result is None
    stored = redis_server.client().hgetall("taskvisor:{p}:task:later-1")
    assert stored == {b"cancel_request_user": b"u", b"cancel_request_reason": b"too late"}
    with pytest.raises(TaskNotFound):
        client.get("p", "later-1")


def test_cancel_without_supervisor_times_out(client, redis_server):
    redis_server.client().hset("taskvisor:{p}:task:idle-1", mapping={"status": "pending", "user": "u", "id": "idle-1"})

    with pytest.raises(WaitTimeout) as caught:
        client.cancel("p", "idle-1", wait=0.3)

    assert "not applied within 0.3 s" in str(caught.value)
    assert redis_server.client().hget("taskvisor:{p}:task:idle-1", "cancel_request_user") == b"*"


def test_set_provider_settings_resizes_provider(client, redis_server, supervisor):
    status_key = "taskvisor:supervisor:test"

    def target() -> int | None:
        raw = redis_server.client().get(status_key)
        return orjson.loads(raw)["providers"]["p"]["target"] if raw else None

    wait_for(lambda: target() == 2, 10, "the supervisor to report 2 workers")
    client.set_provider_settings("p", {"allowConcurrentTasks": True, "maxConcurrentTasks": 3})

    wait_for(lambda: target() == 3, 10, "the supervisor to report 3 workers")
    stored = redis_server.client().hgetall("taskvisor:{p}:settings")
    assert stored[b"maxConcurrentTasks"] == b"3"
    assert stored[b"allowConcurrentTasks"] == b"true"


def test_set_provider_settings_rejects_unknown_key(client, redis_server):
    with pytest.raises(ValueError) as caught:
        client.set_provider_settings("p", {"maxWorkers": 4})

    assert "unknown provider setting maxWorkers" in str(caught.value)
    assert redis_server.client().exists("taskvisor:{p}:settings") == 0
