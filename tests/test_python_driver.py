"""Python drivers run by a real supervisor: results, failures, timeouts and stuck drivers."""

import os
import signal

import psutil
import pytest

from tests.harness import task_hash, wait_for


@pytest.fixture
def run_provider(start_supervisor):
    def start(driver: dict, **provider: object):
        return start_supervisor({"py": {"driver": driver, **provider}})

    return start


def test_python_driver_result_and_errors(run_provider, redis_server):
    run_provider({"type": "tests.sample_drivers:SleepyDriver", "options": {"label": "lab-1"}},
                 allowConcurrentTasks=True, maxConcurrentTasks=3)
    client = redis_server.client()
    stream = "taskvisor:{py}:tasks"
    client.xadd(stream, {"id": "ok", "type": "start", "instance": "vm-1", "user": "u", "data": '{"seconds": 0.3}'})
    client.xadd(stream, {"id": "crash", "type": "stop", "instance": "vm-2", "user": "u"})
    client.xadd(stream, {"id": "locked", "type": "delete", "instance": "vm-3", "user": "u"})
    client.xadd(stream, {"id": "missing", "type": "reset", "instance": "vm-4", "user": "u"})

    wait_for(lambda: all(task_hash(client, "py", t).get("status") in ("completed", "failed")
                         for t in ("ok", "crash", "locked", "missing")), 20, "all four tasks to end")
    ok = task_hash(client, "py", "ok")
    assert ok["status"] == "completed"
    assert '"option":"lab-1"' in ok["result"]
    assert task_hash(client, "py", "crash")["error"] == "ValueError: the hypervisor API returned 500"
    locked = task_hash(client, "py", "locked")
    assert locked["error"] == "instance is locked by a backup job"
    assert locked["result"] == '{"lock":"backup"}'
    assert "has no method for task type 'reset'" in task_hash(client, "py", "missing")["error"]


def test_python_driver_timeout(run_provider, redis_server):
    run_provider({"type": "tests.sample_drivers:SleepyDriver"}, timeouts={"start": 0.5})
    client = redis_server.client()
    client.xadd("taskvisor:{py}:tasks", {"id": "slow", "type": "start", "instance": "vm-1", "user": "u",
                                         "data": '{"seconds": 30}'})
    wait_for(lambda: task_hash(client, "py", "slow").get("status") == "timeout", 10, "the timeout")
    assert task_hash(client, "py", "slow")["error"].startswith("timed out after 0.5 s")


def test_stuck_driver_replaces_worker(run_provider, redis_server):
    supervisor = run_provider({"type": "tests.sample_drivers:StubbornDriver", "killGrace": 0.2}, timeouts={"start": 0.5})
    client = redis_server.client()
    client.xadd("taskvisor:{py}:tasks", {"id": "stuck", "type": "start", "instance": "vm-1", "user": "u"})
    wait_for(lambda: task_hash(client, "py", "stuck").get("status") == "running", 10, "the task to start")
    first_owner = task_hash(client, "py", "stuck")["owner"]
    first_pid = int(first_owner.rsplit(":", 1)[1])

    wait_for(lambda: task_hash(client, "py", "stuck").get("status") == "timeout", 10, "the timeout")
    wait_for(lambda: not psutil.pid_exists(first_pid) or psutil.Process(first_pid).status() == psutil.STATUS_ZOMBIE,
             10, "the stuck worker to exit")
    client.xadd("taskvisor:{py}:tasks", {"id": "next", "type": "stop", "instance": "vm-2", "user": "u"})
    wait_for(lambda: task_hash(client, "py", "next").get("status") == "completed", 15, "a task on the new worker")
    assert task_hash(client, "py", "next")["result"] != f'{{"pid":{first_pid}}}'
    assert "child exited with code 4 role=worker provider=py" in supervisor.log()
    assert "driver ignored stop request task_id=stuck" in supervisor.log()


def test_stuck_driver_cancel_recorded(run_provider, redis_server):
    supervisor = run_provider({"type": "tests.sample_drivers:StubbornDriver", "killGrace": 0.2}, timeouts={"start": 60})
    client = redis_server.client()
    client.xadd("taskvisor:{py}:tasks", {"id": "stuck", "type": "start", "instance": "vm-1", "user": "u"})
    wait_for(lambda: task_hash(client, "py", "stuck").get("status") == "running", 10, "the task to start")
    first_pid = int(task_hash(client, "py", "stuck")["owner"].rsplit(":", 1)[1])

    client.hset("taskvisor:{py}:task:stuck", mapping={"cancel_request_user": "*", "cancel_request_reason": "test"})
    client.publish("taskvisor:cancel", "py stuck")
    wait_for(lambda: task_hash(client, "py", "stuck").get("status") == "cancelled", 10, "the cancel")
    wait_for(lambda: not psutil.pid_exists(first_pid) or psutil.Process(first_pid).status() == psutil.STATUS_ZOMBIE,
             10, "the stuck worker to exit")
    assert client.hget("taskvisor:{py}:instances", "vm-1") == b"stopped"
    assert "driver ignored stop request task_id=stuck provider=py reason=cancel" in supervisor.log()
    # The supervisor logs the exit code when it reaps the worker, which can follow its exit.
    wait_for(lambda: "child exited with code 4 role=worker provider=py" in supervisor.log(), 5,
             "the supervisor to reap the worker")


def test_stuck_probe_replaces_worker(start_supervisor, redis_server):
    # A lease of 60 s: the supervisor releases the killed worker's lease when it reaps it.
    driver = {"type": "tests.sample_drivers:StubbornProbeDriver", "killGrace": 0.2}
    supervisor = start_supervisor({"py": {"driver": driver, "timeouts": {"create": 1}}}, leaseSeconds=60)
    client = redis_server.client()
    client.xadd("taskvisor:{py}:tasks", {"id": "made", "type": "create", "instance": "vm-1", "user": "u"})
    wait_for(lambda: task_hash(client, "py", "made").get("status") == "running", 10, "the create to start")
    first_pid = int(task_hash(client, "py", "made")["owner"].rsplit(":", 1)[1])
    os.kill(first_pid, signal.SIGKILL)

    wait_for(lambda: task_hash(client, "py", "made").get("status") == "timeout", 15, "the probe's timeout")
    task = task_hash(client, "py", "made")
    assert task["attempts"] == "2"
    assert task["message"] == "probe stopped: timeout"
    assert "driver ignored stop request during a probe task_id=made provider=py" in supervisor.log()
    wait_for(lambda: "child exited with code 4 role=worker provider=py" in supervisor.log(), 5,
             "the supervisor to reap the worker that ran the probe")
