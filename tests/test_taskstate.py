"""The Lua state scripts on Redis 7 (the machine's) and Redis 6.2 (the embedded wheel's)."""

import threading

import pytest

from shared.keys import WORKER_GROUP, Keys
from shared.redaction import Redactor
from shared.redis_client import ensure_group
from shared.schema import parse_entry
from shared.states import TaskStatus
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
    """Add an entry, deliver it to a consumer with the take script, and return its parsed spec."""
    stream = KEYS.tasks(provider)
    ensure_group(client, stream, WORKER_GROUP)
    entry_id = client.xadd(stream, fields).decode()
    taken = make_state(client).take(provider, "reader")
    assert taken[0] == entry_id
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
    started = state.start(spec, 300, "w1", 5000)
    assert started.outcome == "ok"
    assert started.attempts == 1
    assert client.hget(KEYS.instances("p"), "vm-1") == b"starting"

    assert state.finish(spec, "w1", TaskStatus.COMPLETED, {}).outcome == "ok"
    assert statuses_in_events(client, "p", "t1") == [("pending", 1), ("running", 2), ("completed", 3)]
    assert client.hget(KEYS.instances("p"), "vm-1") == b"running"
    assert client.xlen(KEYS.tasks("p")) == 0
    assert client.xpending(KEYS.tasks("p"), WORKER_GROUP)["pending"] == 0
    assert client.exists(KEYS.lease("p", "t1")) == 0


def test_terminal_task_cannot_move(client):
    state = make_state(client)
    spec = push(client, "p", id="t2", type="stop", instance="vm-1", user="u")
    state.start(spec, 300, "w1", 5000)
    state.finish(spec, "w1", TaskStatus.FAILED, {"error": "boom"})

    rejected = state.finish(spec, "w1", TaskStatus.COMPLETED, {})
    assert (rejected.outcome, rejected.current) == ("illegal", "failed")
    assert state.start(spec, 300, "w2", 5000).outcome == "finished"
    task = state.read("p", "t2")
    assert task["status"] == "failed"
    assert task["error"] == "boom"
    assert client.hget(KEYS.instances("p"), "vm-1") == b"unknown"


def test_other_owner_is_fenced(client):
    state = make_state(client)
    spec = push(client, "p", id="t3", type="restart", instance="vm-1", user="u")
    state.start(spec, 300, "w1", 5000)

    assert state.start(spec, 300, "w2", 5000).outcome == "busy"
    fenced = state.finish(spec, "w2", TaskStatus.COMPLETED, {})
    assert (fenced.outcome, fenced.current) == ("fenced", "running")
    assert not state.report_progress(spec, "w2", 50, "half", 5000)
    assert state.read("p", "t3")["owner"] == "w1"


def test_expired_lease_is_taken_over(client):
    state = make_state(client)
    spec = push(client, "p", id="t4", type="start", instance="vm-1", user="u")
    client.hset(KEYS.instances("p"), "vm-1", "stopped")
    state.start(spec, 300, "w1", 100)
    wait_for(lambda: client.exists(KEYS.lease("p", "t4")) == 0, 5, "the lease to expire")

    takeover = state.start(spec, 300, "w2", 5000)
    assert takeover.outcome == "ok"
    assert takeover.attempts == 2
    assert state.finish(spec, "w1", TaskStatus.COMPLETED, {}).outcome == "fenced"
    state.finish(spec, "w2", TaskStatus.FAILED, {})
    assert client.hget(KEYS.instances("p"), "vm-1") == b"stopped"


def test_racing_starts_have_one_winner(client):
    specs = [push(client, "p", id=f"race-{index}", type="start", instance=f"vm-{index}", user="u") for index in range(40)]
    outcomes: dict[str, list[str]] = {spec.id: [] for spec in specs}
    barrier = threading.Barrier(4)

    def contend(owner: str) -> None:
        state = make_state(client.__class__(connection_pool=client.connection_pool))
        barrier.wait()
        for spec in specs:
            outcomes[spec.id].append(state.start(spec, 300, owner, 5000).outcome)

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
    state.start(spec, 300, "w1", 5000)

    assert state.finish(spec, "w1", TaskStatus.PENDING, {"message": "interrupted"}).outcome == "ok"
    task = state.read("p", "t5")
    assert task["status"] == "pending"
    assert task["owner"] == ""
    assert client.hget(KEYS.instances("p"), "vm-1") == b"running"
    assert client.xlen(KEYS.tasks("p")) == 1
    assert state.start(spec, 300, "w2", 5000).attempts == 2


def test_duplicate_id_keeps_first(client):
    state = make_state(client)
    first = push(client, "p", id="dup", type="start", instance="vm-1", user="u")
    second = push(client, "q", id="dup", type="delete", instance="vm-9", user="mallory")
    assert state.claim_id(first) is None
    assert state.claim_id(second) == f"p {first.entry}"
    assert state.claim_id(first) is None
    assert state.locate("dup") == "p"


def test_instance_tasks_run_in_order(client):
    state = make_state(client)
    first = push(client, "p", id="a1", type="stop", instance="vm-1", user="u")
    second = push(client, "p", id="a2", type="start", instance="vm-1", user="u")
    other = push(client, "p", id="b1", type="start", instance="vm-2", user="u")

    assert state.start(second, 300, "w2", 5000).outcome == "wait"
    assert state.start(other, 300, "w3", 5000).outcome == "ok"
    assert state.start(first, 300, "w1", 5000).outcome == "ok"
    assert state.start(second, 300, "w2", 5000).outcome == "wait"

    finished = state.finish(first, "w1", TaskStatus.COMPLETED, {}, handoff_consumer="w1-consumer")
    assert finished.handed_over is not None
    assert finished.handed_over[0] == second.entry
    pending = client.xpending_range(KEYS.tasks("p"), WORKER_GROUP, min=second.entry, max=second.entry, count=1)
    assert pending[0]["consumer"] == b"w1-consumer"
    assert state.start(second, 300, "w1", 5000).outcome == "ok"


def test_dead_letter_unblocks_instance(client):
    state = make_state(client)
    stream = KEYS.tasks("p")
    ensure_group(client, stream, WORKER_GROUP)
    bad_id = client.xadd(stream, {"type": "boot", "instance": "vm-1", "user": "u"}).decode()
    make_state(client).take("p", "reader")
    good = push(client, "p", id="g1", type="start", instance="vm-1", user="u")
    assert state.start(good, 300, "w1", 5000).outcome == "wait"

    state.dead_letter("p", bad_id, {b"type": b"boot", b"instance": b"vm-1", b"user": b"u"}, "unknown type")
    assert state.start(good, 300, "w1", 5000).outcome == "ok"


def test_cancel_pending_and_running(client):
    state = make_state(client)
    waiting = push(client, "p", id="c1", type="start", instance="vm-1", user="alice")
    state.admit(waiting, 300)
    assert state.cancel("p", "c1", user="bob") == ["forbidden", "alice"]
    assert state.cancel("p", "c1", user="alice", reason="changed my mind") == ["cancelled"]
    cancelled = state.read("p", "c1")
    assert cancelled["status"] == "cancelled"
    assert cancelled["cancelled_by"] == "alice"
    assert client.xlen(KEYS.tasks("p")) == 0
    assert state.cancel("p", "c1") == ["finished", "cancelled"]

    running = push(client, "p", id="c2", type="stop", instance="vm-2", user="alice")
    client.hset(KEYS.instances("p"), "vm-2", "running")
    state.start(running, 300, "w1", 5000)
    assert state.cancel("p", "c2") == ["cancelling", "w1"]
    assert state.read("p", "c2")["status"] == "cancelling"
    assert state.finish(running, "w1", TaskStatus.CANCELLED, {}).outcome == "ok"
    assert client.hget(KEYS.instances("p"), "vm-2") == b"running"


def test_stored_cancel_request(client):
    state = make_state(client)
    spec = push(client, "p", id="s1", type="restart", instance="vm-1", user="carol")
    # A producer in another language stores the request before the task is registered.
    client.hset(KEYS.task("p", "s1"), mapping={"cancel_request_user": "carol", "cancel_request_reason": "duplicate order"})
    assert state.admit(spec, 300) in (b"cancel_requested", "cancel_requested")
    assert state.start(spec, 300, "w1", 5000).outcome == "cancel_requested"
    assert state.cancel("p", "s1", stored=True) == ["cancelled"]
    assert state.read("p", "s1")["cancel_reason"] == "duplicate order"
    assert state.start(spec, 300, "w1", 5000).outcome == "finished"


def test_cancelling_task_of_dead_worker_ends_cancelled(client):
    state = make_state(client)
    spec = push(client, "p", id="d1", type="start", instance="vm-1", user="u")
    client.hset(KEYS.instances("p"), "vm-1", "stopped")
    state.start(spec, 300, "w1", 100)
    state.cancel("p", "d1")
    wait_for(lambda: client.exists(KEYS.lease("p", "d1")) == 0, 5, "the lease to expire")

    assert state.start(spec, 300, "w2", 5000).outcome == "finished"
    assert state.read("p", "d1")["status"] == "cancelled"
    assert client.hget(KEYS.instances("p"), "vm-1") == b"stopped"
    assert client.xlen(KEYS.tasks("p")) == 0


def worker_start_arguments(state: TaskState, provider: str, owner: str) -> list[str]:
    actions = {task_type: "rerun" for task_type in ("create", "start", "stop", "restart", "delete", "reset", "reset-password")}
    return state.start_arguments(provider, owner, 5000, actions, 3, -1)


def test_finish_takes_and_starts_next(client):
    state = make_state(client)
    first = push(client, "p", id="n1", type="start", instance="vm-1", user="u")
    entry_id = client.xadd(KEYS.tasks("p"), {"id": "n2", "type": "stop", "instance": "vm-2", "user": "u"}).decode()
    second = parse_entry("p", entry_id, {"id": "n2", "type": "stop", "instance": "vm-2", "user": "u"})
    state.admit(first, 300)
    state.admit(second, 300)
    assert state.start(first, 300, "w1", 5000).outcome == "ok"

    finished = state.finish(first, "w1", TaskStatus.COMPLETED, {}, "c1", start_arguments=worker_start_arguments(state, "p", "w1"))
    assert finished.outcome == "ok"
    assert finished.handed_over is None
    taken_id, taken_fields, started = finished.taken_entry
    assert taken_id == entry_id
    assert taken_fields[b"id"] == b"n2"
    assert started.outcome == "ok"
    assert client.hget(KEYS.task("p", "n2"), "status") == b"running"
    assert client.hget(KEYS.task("p", "n2"), "owner") == b"w1"
    assert client.hget(KEYS.instances("p"), "vm-2") == b"stopping"
    pending = client.xpending_range(KEYS.tasks("p"), WORKER_GROUP, min=entry_id, max=entry_id, count=1)
    assert pending[0]["consumer"] == b"c1"


def test_finish_takes_unregistered_entry(client):
    state = make_state(client)
    first = push(client, "p", id="u1", type="start", instance="vm-1", user="u")
    entry_id = client.xadd(KEYS.tasks("p"), {"id": "u2", "type": "start", "instance": "vm-2", "user": "u"}).decode()
    state.admit(first, 300)
    assert state.start(first, 300, "w1", 5000).outcome == "ok"

    finished = state.finish(first, "w1", TaskStatus.COMPLETED, {}, "c1", start_arguments=worker_start_arguments(state, "p", "w1"))
    assert finished.taken_entry[0] == entry_id
    assert finished.taken_entry[2].outcome == "unregistered"
    assert client.exists(KEYS.task("p", "u2")) == 0


def test_finish_without_arguments_takes_nothing(client):
    state = make_state(client)
    first = push(client, "p", id="o1", type="start", instance="vm-1", user="u")
    client.xadd(KEYS.tasks("p"), {"id": "o2", "type": "start", "instance": "vm-2", "user": "u"})
    state.admit(first, 300)
    assert state.start(first, 300, "w1", 5000).outcome == "ok"

    finished = state.finish(first, "w1", TaskStatus.COMPLETED, {}, "c1")
    assert finished.taken_entry is None
    assert client.xpending(KEYS.tasks("p"), WORKER_GROUP)["pending"] == 0


def test_finish_hands_over_before_taking(client):
    state = make_state(client)
    first = push(client, "p", id="h1", type="stop", instance="vm-1", user="u")
    second = push(client, "p", id="h2", type="start", instance="vm-1", user="u")
    client.xadd(KEYS.tasks("p"), {"id": "h3", "type": "start", "instance": "vm-3", "user": "u"})
    assert state.start(first, 300, "w1", 5000).outcome == "ok"

    finished = state.finish(first, "w1", TaskStatus.COMPLETED, {}, "c1", start_arguments=worker_start_arguments(state, "p", "w1"))
    assert finished.handed_over[0] == second.entry
    assert finished.taken_entry is None


@pytest.mark.parametrize(
    ("task_type", "instance_status"),
    [("reset", b"resetting"), ("reset-password", b"running"), ("create", b"creating"), ("restart", b"restarting")],
)
def test_take_applies_type_rules(client, task_type, instance_status):
    state = make_state(client)
    client.hset(KEYS.instances("p"), "vm-1", "running")
    stream = KEYS.tasks("p")
    ensure_group(client, stream, WORKER_GROUP)
    fields = {"id": "r1", "type": task_type, "instance": "vm-1", "user": "u"}
    entry_id = client.xadd(stream, fields).decode()
    state.admit(parse_entry("p", entry_id, fields), 300)

    taken = state.take("p", "c1", worker_start_arguments(state, "p", "w1"))
    assert taken[2].outcome == "ok"
    assert client.hget(KEYS.instances("p"), "vm-1") == instance_status


def test_start_reserves_id_on_one_server(client):
    state = make_state(client)
    first = push(client, "p", id="same", type="start", instance="vm-1", user="u")
    second = push(client, "q", id="same", type="delete", instance="vm-9", user="u")
    assert state.start(first, 300, "w1", 5000).outcome == "ok"

    started = state.start(second, 300, "w2", 5000)
    assert started.outcome == "duplicate"
    assert started.detail == f"p {first.entry}"
    assert client.exists(KEYS.task("q", "same")) == 0
    assert state.locate("same") == "p"


def test_start_names_holder_of_id(client):
    state = make_state(client)
    first = push(client, "p", id="twice", type="start", instance="vm-1", user="u")
    second = push(client, "p", id="twice", type="stop", instance="vm-2", user="u")
    state.admit(first, 300)

    started = state.start(second, 300, "w1", 5000, registered_only=True)
    assert started.outcome == "duplicate"
    assert started.detail == f"p {first.entry}"
