"""A supervisor behind Redis Sentinel keeps working through a failover of the master."""

from shared.keys import Keys
from shared.redaction import Redactor
from shared.redis_client import connect
from shared.schema import parse_entry
from shared.states import TERMINAL_STATUSES
from shared.taskstate import TaskState
from shared.store import open_store
from tests.harness import command_provider, task_hash, wait_for, write_script

KEYS = Keys()
BATCH_SIZE = 20


def terminal_events(client, provider: str) -> dict[str, int]:
    """Count, per task id, the events of the provider's event stream that carry a terminal status."""
    counts: dict[str, int] = {}
    for _entry_id, fields in client.xrange(KEYS.events(provider)):
        if fields.get(b"status", b"").decode() in TERMINAL_STATUSES:
            task_id = fields[b"id"].decode()
            counts[task_id] = counts.get(task_id, 0) + 1
    return counts


def test_sentinel_failover_mid_batch(tmp_path, redis_sentinels, start_supervisor_at, sqlite_url):
    runs = tmp_path / "runs.log"
    script = write_script(tmp_path / "op.sh", f'cat >/dev/null\necho "$3" >> {runs}\nsleep 0.3\necho "{{}}"\n')
    # The lease outlasts the failover, so that a run cut off by it is not taken over twice.
    start_supervisor_at(redis_sentinels.url, {"p": command_provider(script, concurrent=2)}, leaseSeconds=15)
    client = connect(redis_sentinels.url)
    assert client.info("replication")["role"] == "master"

    ids = [f"t-{index:02d}" for index in range(BATCH_SIZE)]
    for index, task_id in enumerate(ids):
        client.xadd(KEYS.tasks("p"), {"id": task_id, "type": "restart", "instance": f"vm-{index % 5}", "user": "u"})
    # Replication is asynchronous: WAIT returns once the replica has every entry pushed
    # above, so none of them can be lost with the master.
    assert client.wait(1, 5000) == 1

    wait_for(lambda: runs.exists() and len(runs.read_text().split()) >= 4, 20, "the batch to be under way")
    redis_sentinels.master.kill()
    started_before_kill = len(runs.read_text().split())
    assert started_before_kill < BATCH_SIZE, "the batch ended before the master was stopped"
    wait_for(lambda: redis_sentinels.master_port() == redis_sentinels.replica.port, 20,
             "the sentinels to promote the replica")  # fmt: skip

    promoted = redis_sentinels.replica.client()
    wait_for(lambda: all(task_hash(promoted, "p", t).get("status") == "completed" for t in ids), 40,
             "every task to complete on the promoted replica")  # fmt: skip
    counts = terminal_events(promoted, "p")
    for task_id in ids:
        assert counts.get(task_id) == 1, f"{task_id} has {counts.get(task_id, 0)} terminal events"
    ran = runs.read_text().split()
    assert set(ran) == set(ids)

    def sql_statuses() -> dict[str, str]:
        store = open_store(sqlite_url)
        try:
            return {row["id"]: row["status"] for row in store.list_tasks(provider="p", limit=500)}
        finally:
            store.close()

    wait_for(lambda: sql_statuses() == {task_id: "completed" for task_id in ids}, 20, "every task completed in SQL")


def test_sentinel_failover_loses_unreplicated_push(redis_sentinels):
    """A push that the master acknowledged but never sent to the replica is gone after a failover.

    WAIT is how a panel learns of the risk: it reports 0 replicas for such a push.
    """
    client = connect(redis_sentinels.url)
    client.xadd(KEYS.tasks("p"), {"id": "kept", "type": "start", "instance": "vm-1", "user": "u"})
    assert client.wait(1, 5000) == 1
    # The replica's link is cut, and a wrong master password keeps it from coming back,
    # so the next write stays on the master alone.
    redis_sentinels.replica.client().config_set("masterauth", "wrong-password")
    redis_sentinels.master.client().execute_command("CLIENT", "KILL", "TYPE", "replica")
    assert client.xadd(KEYS.tasks("p"), {"id": "lost", "type": "start", "instance": "vm-1", "user": "u"})
    assert client.wait(1, 500) == 0
    redis_sentinels.master.kill()
    wait_for(lambda: redis_sentinels.master_port() == redis_sentinels.replica.port, 20,
             "the sentinels to promote the replica")  # fmt: skip

    ids = [fields[b"id"] for _entry_id, fields in client.xrange(KEYS.tasks("p"))]
    assert ids == [b"kept"]


def test_task_scripts_reach_sentinel_master(redis_sentinels):
    """The scripts of a task's start and end, sent on a connection of their own, go to the current master."""
    client = connect(redis_sentinels.url)
    state = TaskState(client, KEYS, events_max_len=1000, dead_max_len=1000, redactor=Redactor())
    spec = parse_entry("p", "1-1", {b"id": b"direct-1", b"type": b"start", b"instance": b"vm-1", b"user": b"u"})
    state.admit(spec, 30)
    assert redis_sentinels.master.client().hget(KEYS.task("p", "direct-1"), "status") == b"pending"
    info = state.direct.execute([("INFO", "server")])[0].decode()
    assert f"tcp_port:{redis_sentinels.master.port}\r\n" in info
