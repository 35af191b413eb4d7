"""/metrics of a real supervisor: task flow counters, histograms, stream gauges and reconnects."""

import io
import logging
import os

import pytest

from shared import heartbeat
from shared.heartbeat import HeartbeatTable
from shared.logs import setup_logging
from supervisor.metrics import DURATION_BUCKETS, ReconnectTotals, TaskCounts
from supervisor.prometheus import MetricsWriter
from tests.harness import cli, command_provider, task_hash, wait_for, write_script
from tests.test_health import get, parse_prometheus, readiness

HEALTH = {"heartbeatTimeout": 2}
FINAL = ("completed", "failed", "timeout", "cancelled")
PUSHED_TYPES = ("start", "stop", "restart", "delete")


def metrics(url: str) -> dict[str, dict]:
    code, body = get(url, "/metrics")
    assert code == 200, body
    return parse_prometheus(body.decode("utf-8"))


def series(families: dict, name: str, **labels: str) -> dict[tuple, float]:
    """Return the samples of `name` whose labels include `labels`, keyed by their other labels."""
    found = {}
    for key, value in families[name]["samples"].items():
        pairs = dict(key)
        if all(pairs.get(label) == wanted for label, wanted in labels.items()):
            found[tuple(sorted((k, v) for k, v in pairs.items() if k not in labels))] = value
    return found


def histogram(families: dict, name: str, **labels: str) -> dict:
    """Return {"buckets": {le: cumulative count}, "sum", "count"} of one histogram series."""
    buckets, result = {}, {}
    for key, value in families[name]["samples"].items():
        pairs = dict(key)
        if any(pairs.get(label) != wanted for label, wanted in labels.items()):
            continue
        sample = pairs.pop("__name__")
        if sample.endswith("_bucket"):
            buckets[pairs["le"]] = value
        else:
            result[sample.rpartition("_")[2]] = value
    return {"buckets": buckets, **result}


@pytest.fixture
def flow_supervisor(start_supervisor, tmp_path):
    # start and reset-password complete after 0.3 s; stop fails; restart outlives its
    # 1 s timeout; delete runs until it is cancelled.
    script = write_script(
        tmp_path / "op.sh",
        'cat >/dev/null\ncase "$1" in\n'
        '  stop) echo "hypervisor refused" >&2; exit 1;;\n'
        '  restart) sleep 30;;\n'
        '  delete) sleep 30;;\n'
        '  *) sleep 0.3; echo "{}";;\n'
        'esac\n',
    )
    provider = command_provider(script, concurrent=4, timeouts={"restart": 1})
    provider.update(maxRetries={"stop": 1}, retryBackoffBase=0.2, retryBackoffCap=1)
    supervisor = start_supervisor({"p": provider}, health=HEALTH)
    url = supervisor.health_url()
    wait_for(lambda: readiness(url)[0] == 200, 15, "/readyz to answer 200 after the start")
    return supervisor, url


def test_metrics_count_task_flow(flow_supervisor, redis_server):
    supervisor, url = flow_supervisor
    client = redis_server.client()
    stream = "taskvisor:{p}:tasks"
    for task_id, task_type, instance in (("s-1", "start", "vm-1"), ("s-2", "start", "vm-2"), ("f-1", "stop", "vm-3"),
                                         ("t-1", "restart", "vm-4"), ("c-1", "delete", "vm-5")):  # fmt: skip
        client.xadd(stream, {"id": task_id, "type": task_type, "instance": instance, "user": "u"})
    client.xadd(stream, {"type": "reboot", "instance": "vm-6", "user": "u"})

    wait_for(lambda: task_hash(client, "p", "c-1").get("status") == "running", 10, "the delete task to run")
    cancelled = cli(supervisor.config_path, "cancel", "c-1")
    assert cancelled.returncode == 0, cancelled.stderr

    def all_final() -> bool:
        return all(task_hash(client, "p", task).get("status") in FINAL for task in ("s-1", "s-2", "f-1", "t-1", "c-1"))

    wait_for(all_final, 20, "every task to end")
    families = wait_for(lambda: _settled(url), 10, "the mirror backlog and the event counters to settle")

    # A rejected entry may be recorded as a failed task of its own type, so only the
    # pushed types are compared.
    ended = {labels: count for labels, count in series(families, "taskvisor_tasks_ended_total", provider="p").items()
             if dict(labels)["type"] in PUSHED_TYPES}  # fmt: skip
    assert ended == {
        (("status", "completed"), ("type", "start")): 2,
        (("status", "failed"), ("type", "stop")): 1,
        (("status", "timeout"), ("type", "restart")): 1,
        (("status", "cancelled"), ("type", "delete")): 1,
    }
    assert families["taskvisor_tasks_ended_total"]["type"] == "counter"
    assert series(families, "taskvisor_task_retries_total", provider="p") == {(("type", "stop"),): 1}
    assert task_hash(client, "p", "f-1")["retries"] == "1"

    run = histogram(families, "taskvisor_task_run_seconds", provider="p", type="start")
    assert families["taskvisor_task_run_seconds"]["type"] == "histogram"
    assert run["count"] == 2
    assert 0.6 <= run["sum"] < 10, run
    assert run["buckets"]["0.1"] == 0
    assert run["buckets"]["+Inf"] == 2
    assert list(run["buckets"].values()) == sorted(run["buckets"].values()), "buckets must be cumulative"
    assert len(run["buckets"]) == len(DURATION_BUCKETS) + 1
    timed_out = histogram(families, "taskvisor_task_run_seconds", provider="p", type="restart")
    assert timed_out["count"] == 1
    assert timed_out["sum"] >= 1
    wait = histogram(families, "taskvisor_task_queue_wait_seconds", provider="p", type="start")
    assert wait["count"] == 2
    assert 0 <= wait["sum"] < 10

    assert series(families, "taskvisor_dead_letters", provider="p") == {(): 1}
    assert series(families, "taskvisor_retries_waiting", provider="p") == {(): 0}
    workers_group = series(families, "taskvisor_consumer_group_pending", provider="p", stream="tasks")
    assert workers_group == {(("group", "workers"),): 0}
    assert series(families, "taskvisor_consumer_group_lag", provider="p", stream="tasks") == {(("group", "workers"),): 0}
    assert series(families, "taskvisor_mirror_backlog", provider="p") == {(): 0}
    sources = {dict(labels)["source"]: value for labels, value in families["taskvisor_source_up"]["samples"].items()}
    assert sources == {"database": 1, "redis": 1}


def _settled(url: str) -> dict | None:
    families = metrics(url)
    ended = families["taskvisor_tasks_ended_total"]["samples"]
    backlog = families["taskvisor_mirror_backlog"]["samples"]
    pushed = sum(count for labels, count in ended.items() if dict(labels)["type"] in PUSHED_TYPES)
    if pushed == 5 and backlog and all(value == 0 for value in backlog.values()):
        return families
    return None


def test_metrics_count_redis_reconnects(flow_supervisor, redis_server):
    supervisor, url = flow_supervisor
    before = series(metrics(url), "taskvisor_reconnects_total", target="redis")
    assert before.get((("role", "worker"),)) == 0

    redis_server.stop()
    wait_for(lambda: "redis unavailable provider=p" in supervisor.log(), 10, "a worker to log the outage")
    redis_server.start()
    wait_for(lambda: readiness(url)[0] == 200, 15, "/readyz to recover after Redis restarts")

    after = series(metrics(url), "taskvisor_reconnects_total", target="redis")
    assert after[(("role", "worker"),)] >= 1
    assert after[(("role", "intake"),)] >= 1
    assert series(metrics(url), "taskvisor_reconnects_total", target="database")[(("role", "mirror"),)] == 0


def test_reconnect_lines_counted_in_slot():
    table = HeartbeatTable(slot_count=4)
    index = table.assign("mirror", "", 0)
    table.set_pid(index, os.getpid())
    totals = ReconnectTotals(table)
    heartbeat.attach(table, index)
    # The lines count even when the log level hides them.
    stream = io.StringIO()
    setup_logging("ERROR", stream=stream)
    try:
        logging.getLogger("supervisor.mirror").warning("database write failed; events kept in redis retry_in=%.1fs error=%s", 0.5, "x")
        logging.getLogger("shared.store.mysql").warning("%s on %s lost the connection (%s), reconnecting and retrying once",
                                                        "reading", "mysql://u:***@h/db", "gone")  # fmt: skip
        logging.getLogger("worker.main").warning("redis unavailable provider=p pid=1 retry_in=0.5s error=refused")
        logging.getLogger("worker.main").warning("something else failed")
        slot = table.read_slot(index)
        assert (slot.redis_reconnects, slot.database_reconnects) == (1, 2)
        assert stream.getvalue() == ""
        assert totals.totals()[("mirror", "database")] == 2

        # The counts of a process stay in the totals after its slot is given to another process.
        table.release(index, 0, exit_requested=False)
        totals.collect()
        table.exit_record_seconds = 0
        table.assign("worker", "p", 0)
        assert totals.totals()[("mirror", "database")] == 2
        assert totals.totals()[("mirror", "redis")] == 1
    finally:
        heartbeat.attach(None, -1)
        setup_logging("WARNING")


def test_task_counts_count_each_retry_once():
    counts = TaskCounts()
    retry = {"id": "t", "provider": "p", "type": "stop", "status": "pending", "retry_at": "100.5", "retries": "1"}
    assert counts.observe(retry)
    assert not counts.observe(retry)
    counts.observe({**retry, "retries": "2"})
    counts.observe({"id": "t", "provider": "p", "type": "stop", "status": "cancelled", "created_at": "1.0",
                    "started_at": "", "completed_at": "5.0"})  # fmt: skip
    out = MetricsWriter()
    counts.write(out)
    families = parse_prometheus(out.text())
    assert series(families, "taskvisor_task_retries_total") == {(("provider", "p"), ("type", "stop")): 2}
    assert series(families, "taskvisor_tasks_ended_total", status="cancelled") == {(("provider", "p"), ("type", "stop")): 1}
    # A task cancelled before it started has neither run time nor queue wait.
    assert families["taskvisor_task_run_seconds"]["samples"] == {}
    assert families["taskvisor_task_queue_wait_seconds"]["samples"] == {}


def test_task_counts_pass_through_the_board():
    # The mirror counts events with their fields as Redis returns them and publishes the
    # counts. The monitor reads them back from the same shared mapping.
    table = HeartbeatTable(slot_count=8)
    assert table.read_board() == b""
    assert TaskCounts.from_snapshot(table.read_board()).ended == {}
    counts = TaskCounts()
    started = {b"id": b"a", b"provider": b"p", b"type": b"start", b"status": b"running", b"created_at": b"10.0",
               b"started_at": b"10.5", b"completed_at": b""}  # fmt: skip
    assert not counts.observe_fields(started)
    assert counts.observe_fields({**started, b"status": b"completed", b"completed_at": b"12.5"})
    assert counts.observe_fields({**started, b"id": b"b", b"status": b"failed", b"completed_at": b"10.6"})
    assert table.publish(counts.snapshot())

    out = MetricsWriter()
    TaskCounts.from_snapshot(table.read_board()).write(out)
    families = parse_prometheus(out.text())
    assert series(families, "taskvisor_tasks_ended_total") == {
        (("provider", "p"), ("status", "completed"), ("type", "start")): 1,
        (("provider", "p"), ("status", "failed"), ("type", "start")): 1,
    }
    run = histogram(families, "taskvisor_task_run_seconds", provider="p", type="start")
    assert run["count"] == 2
    assert run["sum"] == pytest.approx(2.1)
    assert run["buckets"]["0.1"] == 1
    assert run["buckets"]["2.5"] == 2

    # Contents that are not a snapshot give empty counts instead of an error.
    assert table.publish(b"not json")
    assert TaskCounts.from_snapshot(table.read_board()).ended == {}
    assert not table.publish(bytes(len(table.board)))
