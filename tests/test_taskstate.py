"""The Lua state scripts on Redis 7 (the machine's) and Redis 6.2 (the embedded wheel's)."""

import threading

import pytest

from shared.keys import WORKER_GROUP, Keys
from shared.redaction import Redactor
from shared.redis_client import ensure_group
from shared.schema import parse_entry
from shared.states import TaskStatus, instance_rule_after, instance_rule_while_running
from shared.taskstate import TaskState
from tests.harness import wait_for

KEYS = Keys("taskvisor")


@pytest.fixture(params=["redis7", "redis62"])
def client(request):
    server = request.getfixturevalue("redis_server" if request.param == "redis7" else "redis62_server")
    return server.client()


def make_state(client) -> TaskState:
    return TaskState(client, KEYS, events_max_len=10000, dead_max_len=1000, redactor=Redactor())


def push(client, provider: str, **fields: str):
    """Add an entry, deliver it to a consumer, and return its parsed spec."""
    stream = KEYS.tasks(provider)
    ensure_group(client, stream, WORKER_GROUP)
    entry_id = client.xadd(stream, fields).decode()
    client.xreadgroup(WORKER_GROUP, "reader", {stream: ">"}, count=100)
    return parse_entry(provider, entry_id, fields)


def statuses_in_events(client, provider: str, task_id: str) -> list[tuple[str, int]]:
    out = []
    for _entry, fields in client.xrange(KEYS.events(provider)):
        if fields[b"id"].decode() == task_id:
            out.append((fields[b"status"].decode(), int(fields[b"version"])))
    return out


def test_task_lifecycle_events(client):
    state = make_state(client)
    spec = push(client, "p", id="t1", type="start", instance="vm-1", user="u")
    state.admit(spec, 300)
    started = state.start(spec, 300, "w1", 5000, instance_rule_while_running(spec.type))
    assert started.outcome == "ok"
    assert started.attempts == 1
    assert client.hget(KEYS.instances("p"), "vm-1") == b"starting"

    outcome = state.finish(spec, "w1", TaskStatus.COMPLETED, instance_rule_after(spec.type, TaskStatus.COMPLETED), {})
    assert outcome == ("ok", "")
    assert statuses_in_events(client, "p", "t1") == [("pending", 1), ("running", 2), ("completed", 3)]
    assert client.hget(KEYS.instances("p"), "vm-1") == b"running"
    assert client.xlen(KEYS.tasks("p")) == 0
    assert client.xpending(KEYS.tasks("p"), WORKER_GROUP)["pending"] == 0
    assert client.exists(KEYS.lease("p", "t1")) == 0


def test_terminal_task_cannot_move(client):
    state = make_state(client)
    spec = push(client, "p", id="t2", type="stop", instance="vm-1", user="u")
    state.start(spec, 300, "w1", 5000, "stopping")
    state.finish(spec, "w1", TaskStatus.FAILED, "restore", {"error": "boom"})

    assert state.finish(spec, "w1", TaskStatus.COMPLETED, "stopped", {}) == ("illegal", "failed")
    assert state.start(spec, 300, "w2", 5000, "stopping").outcome == "finished"
    task = state.read("p", "t2")
    assert task["status"] == "failed"
    assert task["error"] == "boom"
    assert client.hget(KEYS.instances("p"), "vm-1") == b"unknown"


def test_other_owner_is_fenced(client):
    state = make_state(client)
    spec = push(client, "p", id="t3", type="restart", instance="vm-1", user="u")
    state.start(spec, 300, "w1", 5000, "restarting")

    assert state.start(spec, 300, "w2", 5000, "restarting").outcome == "busy"
    assert state.finish(spec, "w2", TaskStatus.COMPLETED, "running", {}) == ("fenced", "running")
    assert not state.report_progress(spec, "w2", 50, "half", 5000)
    assert state.read("p", "t3")["owner"] == "w1"


def test_expired_lease_is_taken_over(client):
    state = make_state(client)
    spec = push(client, "p", id="t4", type="start", instance="vm-1", user="u")
    client.hset(KEYS.instances("p"), "vm-1", "stopped")
    state.start(spec, 300, "w1", 100, "starting")
    wait_for(lambda: client.exists(KEYS.lease("p", "t4")) == 0, 5, "the lease to expire")

    takeover = state.start(spec, 300, "w2", 5000, "starting")
    assert takeover.outcome == "ok"
    assert takeover.attempts == 2
    assert state.finish(spec, "w1", TaskStatus.COMPLETED, "running", {}) == ("fenced", "running")
    state.finish(spec, "w2", TaskStatus.FAILED, instance_rule_after(spec.type, TaskStatus.FAILED), {})
    assert client.hget(KEYS.instances("p"), "vm-1") == b"stopped"


def test_racing_starts_have_one_winner(client):
    specs = [push(client, "p", id=f"race-{index}", type="start", instance=f"vm-{index}", user="u") for index in range(40)]
    outcomes: dict[str, list[str]] = {spec.id: [] for spec in specs}
    barrier = threading.Barrier(4)

    def contend(owner: str) -> None:
        state = make_state(client.__class__(connection_pool=client.connection_pool))
        barrier.wait()
        for spec in specs:
            outcomes[spec.id].append(state.start(spec, 300, owner, 5000, "starting").outcome)

    threads = [threading.Thread(target=contend, args=(f"w{index}",)) for index in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    for task_id, results in outcomes.items():
        assert sorted(results) == ["busy", "busy", "busy", "ok"], task_id


def test_requeue_restores_instance(client):
    state = make_state(client)
    spec = push(client, "p", id="t5", type="stop", instance="vm-1", user="u")
    client.hset(KEYS.instances("p"), "vm-1", "running")
    state.start(spec, 300, "w1", 5000, "stopping")

    assert state.finish(spec, "w1", TaskStatus.PENDING, "restore", {"message": "interrupted"}) == ("ok", "")
    task = state.read("p", "t5")
    assert task["status"] == "pending"
    assert task["owner"] == ""
    assert client.hget(KEYS.instances("p"), "vm-1") == b"running"
    assert client.xlen(KEYS.tasks("p")) == 1
    assert state.start(spec, 300, "w2", 5000, "stopping").attempts == 2


def test_duplicate_id_keeps_first(client):
    state = make_state(client)
    first = push(client, "p", id="dup", type="start", instance="vm-1", user="u")
    second = push(client, "q", id="dup", type="delete", instance="vm-9", user="mallory")
    assert state.claim_id(first) is None
    assert state.claim_id(second) == f"p {first.entry}"
    assert state.claim_id(first) is None
    assert state.locate("dup") == "p"
