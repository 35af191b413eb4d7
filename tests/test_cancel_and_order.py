"""Per-instance ordering and cancellation, with a real supervisor and real commands."""

import os
import subprocess
import sys
import time

import orjson
import psutil
import pytest

from shared.keys import Keys
from shared.redaction import Redactor
from shared.taskstate import TaskState
from tests.harness import REPO, SupervisorProcess, command_provider, task_hash, wait_for, write_script

TERMINAL = {"completed", "failed", "timeout", "cancelled"}


def cli(config_path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), TASKVISOR_CONFIG=str(config_path))
    return subprocess.run([sys.executable, "-m", "supervisor", *args], capture_output=True, text=True, env=env, timeout=60)


def test_instance_order_and_exclusion(tmp_path, redis_server, start_supervisor):
    log_path = tmp_path / "runs.log"
    script = write_script(
        tmp_path / "op.sh",
        f'cat >/dev/null\necho "start $3 $2 $(date +%s.%N)" >> {log_path}\nsleep 0.15\n'
        f'echo "end $3 $2 $(date +%s.%N)" >> {log_path}\necho "{{}}"\n',
    )
    client = redis_server.client()
    pushed: dict[str, list[str]] = {}
    for index in range(48):
        instance = f"vm-{index % 6}" if index % 4 else "vm-0"
        task_id = f"t-{index:02d}"
        client.xadd("taskvisor:{p}:tasks", {"id": task_id, "type": "restart", "instance": instance, "user": "u"})
        pushed.setdefault(instance, []).append(task_id)
    start_supervisor({"p": command_provider(script, concurrent=4)})

    all_ids = [task_id for ids in pushed.values() for task_id in ids]
    wait_for(lambda: all(task_hash(client, "p", t).get("status") == "completed" for t in all_ids), 60, "every task")
    events = [line.split() for line in log_path.read_text().splitlines()]
    for instance, expected in pushed.items():
        runs = [(kind, task_id, float(stamp)) for kind, task_id, inst, stamp in events if inst == instance]
        started = [task_id for kind, task_id, _stamp in runs if kind == "start"]
        assert started == expected, f"{instance} ran out of order"
        running = 0
        for kind, _task_id, _stamp in sorted(runs, key=lambda run: run[2]):
            running += 1 if kind == "start" else -1
            assert running <= 1, f"two tasks of {instance} overlapped"
    peak = running = 0
    for kind, *_rest in sorted(events, key=lambda event: float(event[3])):
        running += 1 if kind == "start" else -1
        peak = max(peak, running)
    assert peak == 4


def test_cancel_latency_and_cleanup(tmp_path, redis_server, start_supervisor):
    pids = tmp_path / "pids"
    pids.mkdir()
    script = write_script(tmp_path / "long.sh", f'cat >/dev/null\necho $$ > {pids}/$3\nsleep 30 &\nwait\n')
    start_supervisor({"p": command_provider(script, concurrent=4, kill_grace=1.0)})
    client = redis_server.client()
    state = TaskState(client, Keys(), 100000, 10000, Redactor())
    latencies = []
    for round_number in range(6):
        ids = [f"c-{round_number}-{index}" for index in range(4)]
        for index, task_id in enumerate(ids):
            client.xadd("taskvisor:{p}:tasks", {"id": task_id, "type": "start", "instance": f"vm-{index}", "user": "u"})
        wait_for(lambda ids=ids: all((pids / t).exists() for t in ids), 15, "four running commands")
        for task_id in ids:
            began = time.monotonic()
            assert state.cancel("p", task_id, reason="test") == ["cancelling", task_hash(client, "p", task_id)["owner"]]
            client.publish("taskvisor:cancel", f"p {task_id}")
            wait_for(lambda t=task_id: task_hash(client, "p", t).get("status") == "cancelled", 5, f"{task_id} cancelled")
            latencies.append(time.monotonic() - began)
            pid = int((pids / task_id).read_text())
            wait_for(lambda pid=pid: not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE,
                     2, "the cancelled command to be gone")
    latencies.sort()
    assert len(latencies) == 24
    assert latencies[int(len(latencies) * 0.99) - 1] < 2.0
    assert not [p for p in psutil.process_iter(["cmdline"]) if "long.sh" in " ".join(p.info["cmdline"] or [])]


def test_cancel_pending_wrong_user_and_finished(tmp_path, redis_server, start_supervisor):
    ran = tmp_path / "ran.log"
    # The first task runs long enough for both cancel calls to find the second one still pending.
    blocker = write_script(tmp_path / "op.sh", f'cat >/dev/null\necho "$3" >> {ran}\n[ "$3" = first ] && sleep 4\necho "{{}}"\n')
    supervisor = start_supervisor({"p": command_provider(blocker)})
    client = redis_server.client()
    client.xadd("taskvisor:{p}:tasks", {"id": "first", "type": "start", "instance": "vm-1", "user": "alice"})
    client.xadd("taskvisor:{p}:tasks", {"id": "queued", "type": "stop", "instance": "vm-2", "user": "alice"})
    wait_for(lambda: task_hash(client, "p", "queued").get("status") == "pending", 5, "the queued task")

    wrong = cli(supervisor.config_path, "cancel", "queued", "--user", "mallory")
    assert wrong.returncode == 1
    assert "user 'mallory' may not cancel task 'queued': it belongs to user 'alice'" in wrong.stderr
    assert task_hash(client, "p", "queued")["status"] == "pending"

    done = cli(supervisor.config_path, "cancel", "queued", "--user", "alice", "--reason", "ordered by mistake")
    assert done.returncode == 0
    assert "queued cancelled before it started" in done.stdout
    wait_for(lambda: task_hash(client, "p", "first").get("status") == "completed", 10, "the first task")
    again = cli(supervisor.config_path, "cancel", "first")
    assert again.returncode == 1
    assert "task 'first' already ended as completed; nothing was changed" in again.stderr
    # The provider is serial: had the cancelled task run, it would have run before this one.
    client.xadd("taskvisor:{p}:tasks", {"id": "after", "type": "stop", "instance": "vm-2", "user": "alice"})
    wait_for(lambda: task_hash(client, "p", "after").get("status") == "completed", 10, "the task after it")
    assert ran.read_text().split() == ["first", "after"]
    assert task_hash(client, "p", "queued")["cancel_reason"] == "ordered by mistake"


@pytest.mark.parametrize(("task_type", "before", "after"), [("start", "stopped", "stopped"),
                                                            ("stop", "running", "running"),
                                                            ("create", None, "error"),
                                                            ("restart", "stopped", "stopped")])
def test_cancel_restores_instance(tmp_path, redis_server, start_supervisor, task_type, before, after):
    started = tmp_path / "started"
    script = write_script(tmp_path / "op.sh", f'cat >/dev/null\nif [ "$3" = quick ]; then echo "{{}}"; exit 0; fi\n'
                                              f'touch {started}\nexec sleep 30\n')
    supervisor = start_supervisor({"p": command_provider(script, kill_grace=0.5)})
    client = redis_server.client()
    if before:
        setup = {"stopped": "stop", "running": "start"}[before]
        client.xadd("taskvisor:{p}:tasks", {"id": "quick", "type": setup, "instance": "vm-1", "user": "u"})
    client.xadd("taskvisor:{p}:tasks", {"id": "slow", "type": task_type, "instance": "vm-1", "user": "u"})
    wait_for(started.exists, 10, "the slow task to start")
    shown = orjson.loads(cli(supervisor.config_path, "get", "slow", "--json").stdout)
    assert shown["status"] == "running"
    assert shown["timeout"] - 10 < shown["remaining_seconds"] <= shown["timeout"]

    result = cli(supervisor.config_path, "cancel", "slow", "--wait", "10")
    assert result.returncode == 0
    assert "slow cancelled" in result.stdout
    assert client.hget("taskvisor:{p}:instances", "vm-1").decode() == after


def test_cancel_while_supervisor_down(tmp_path, redis_server, start_supervisor):
    script = write_script(tmp_path / "op.sh", 'cat >/dev/null\necho "{}"\n')
    client = redis_server.client()
    client.xadd("taskvisor:{p}:tasks", {"id": "early", "type": "start", "instance": "vm-1", "user": "dana"})
    # A producer in another language: the request goes into the task hash, then a notice.
    client.hset("taskvisor:{p}:task:early", mapping={"cancel_request_user": "dana", "cancel_request_reason": "not needed"})
    client.publish("taskvisor:cancel", "p early")
    client.xadd("taskvisor:{p}:tasks", {"id": "later", "type": "stop", "instance": "vm-1", "user": "dana"})

    start_supervisor({"p": command_provider(script)})
    wait_for(lambda: task_hash(client, "p", "later").get("status") == "completed", 15, "the later task")
    early = task_hash(client, "p", "early")
    assert early["status"] == "cancelled"
    assert early["cancelled_by"] == "dana"
    assert early["started_at"] == ""


def test_cancel_racing_completion(tmp_path, redis_server, sqlite_url, start_supervisor):
    from shared.store import open_store

    script = write_script(tmp_path / "op.sh", 'cat >/dev/null\nsleep 0.0$(( 1$(date +%N) % 9 ))\necho "{}"\n')
    start_supervisor({"p": command_provider(script, concurrent=2)})
    client = redis_server.client()
    state = TaskState(client, Keys(), 100000, 10000, Redactor())
    replies = {}
    for index in range(20):
        task_id = f"race-{index}"
        client.xadd("taskvisor:{p}:tasks", {"id": task_id, "type": "restart", "instance": f"vm-{index}", "user": "u"})
        wait_for(lambda t=task_id: task_hash(client, "p", t).get("status") in ("running", *TERMINAL), 10, "the start")
        replies[task_id] = state.cancel("p", task_id)[0]
        client.publish("taskvisor:cancel", f"p {task_id}")

    wait_for(lambda: all(task_hash(client, "p", t).get("status") in TERMINAL for t in replies), 20, "every task to end")
    store = open_store(sqlite_url)
    try:
        wait_for(lambda: all((store.get_task(t) or {}).get("status") in TERMINAL for t in replies), 10, "the SQL rows")
        for task_id, reply in replies.items():
            status = task_hash(client, "p", task_id)["status"]
            assert status in ("completed", "cancelled"), task_id
            assert store.get_task(task_id)["status"] == status, task_id
            if reply == "finished":
                assert status == "completed", task_id
    finally:
        store.close()


def test_instance_exclusion_survives_worker_crash(tmp_path, redis_server, start_supervisor):
    locks = tmp_path / "locks"
    locks.mkdir()
    overlaps = tmp_path / "overlaps.log"
    runs = tmp_path / "runs.log"
    # flock is released by the kernel when the holder dies, so a killed run cannot fake an overlap.
    script = write_script(
        tmp_path / "op.sh",
        f'cat >/dev/null\nexec 9>"{locks}/$2"\nflock -n 9 || echo "$3" >> {overlaps}\n'
        f'echo "$3 $2 $$" >> {runs}\nsleep 0.3\necho "{{}}"\n',
    )
    start_supervisor({"p": command_provider(script, concurrent=3)})
    client = redis_server.client()
    pushed: dict[str, list[str]] = {}
    for index in range(24):
        instance = f"vm-{index % 4}"
        task_id = f"k-{index:02d}"
        client.xadd("taskvisor:{p}:tasks", {"id": task_id, "type": "restart", "instance": instance, "user": "u"})
        pushed.setdefault(instance, []).append(task_id)
    for victim_number in range(2):
        wait_for(lambda n=victim_number: runs.exists() and len(runs.read_text().splitlines()) >= 4 + 6 * n,
                 20, "tasks to be running")
        owners = [int(fields["owner"].rsplit(":", 1)[1])
                  for fields in (task_hash(client, "p", f"k-{i:02d}") for i in range(24)) if fields.get("status") == "running"]
        os.kill(next(pid for pid in owners if psutil.pid_exists(pid)), 9)

    all_ids = [task_id for ids in pushed.values() for task_id in ids]
    wait_for(lambda: all(task_hash(client, "p", t).get("status") == "completed" for t in all_ids), 60, "every task")
    assert not overlaps.exists()
    first_starts: dict[str, list[str]] = {}
    for line in runs.read_text().splitlines():
        task_id, instance, _pid = line.split()
        if task_id not in first_starts.setdefault(instance, []):
            first_starts[instance].append(task_id)
    assert first_starts == pushed
    assert sum(int(task_hash(client, "p", t)["attempts"]) for t in all_ids) == 26


def test_cli_cancel_before_registration(tmp_path, redis_server, start_supervisor):
    script = write_script(tmp_path / "op.sh", 'cat >/dev/null\necho "{}"\n')
    client = redis_server.client()
    client.xadd("taskvisor:{p}:tasks", {"id": "unseen", "type": "start", "instance": "vm-1", "user": "u"})
    supervisor = SupervisorProcess(tmp_path, redis_server.url, f"sqlite:///{tmp_path / 'db.sqlite'}",
                                   {"p": command_provider(script)})  # only its config file is used here

    wrong = cli(supervisor.config_path, "cancel", "unseen", "--provider", "q")
    assert wrong.returncode == 1
    assert "unknown provider 'q'" in wrong.stderr
    stored = cli(supervisor.config_path, "cancel", "unseen", "--provider", "p", "--reason", "too late")
    assert stored.returncode == 0, stored.stderr
    assert "unseen is not registered yet; the cancel request is stored" in stored.stdout

    start_supervisor({"p": command_provider(script)})
    wait_for(lambda: task_hash(client, "p", "unseen").get("status") == "cancelled", 10, "the stored cancel to apply")
    assert task_hash(client, "p", "unseen")["cancel_reason"] == "too late"
    assert task_hash(client, "p", "unseen")["started_at"] == ""
    mismatch = cli(supervisor.config_path, "cancel", "unseen", "--provider", "other")
    assert mismatch.returncode == 1
    assert "belongs to provider 'p', not 'other'" in mismatch.stderr
