"""Hundreds of tasks while workers are SIGKILLed, Redis restarts and MariaDB restarts.

Each run of the operation script writes `start` and `end` lines with times. It also
takes a lock per instance, which the kernel drops when the process dies, so an
overlap of two runs of one instance shows even when one of them is killed. A `create` or `delete`
takes effect by making or removing a file with noclobber, so a second effect shows.
"""

import os
import random
import signal
import time
from collections import Counter, defaultdict

import psutil

from shared.keys import Keys
from shared.redaction import Redactor
from shared.taskstate import TaskState
from tests.harness import command_provider, task_hash, wait_for, write_script

PROVIDERS = {"alpha": 3, "beta": 2, "gamma": 1}
TASKS_PER_PROVIDER = 100
INSTANCES_PER_PROVIDER = 8
IDEMPOTENT = ("start", "stop", "restart", "reset-password")
MAX_INTERRUPTED_RUNS = 4
MAX_RETRIES = 1
TERMINAL = {"completed", "failed", "timeout", "cancelled"}

OPERATION = """cat >/dev/null
exec 9>"{locks}/$TASKVISOR_PROVIDER-$2"
flock -n 9 || echo "overlap $3" >> "{log}"
echo "start $3 $(date +%s.%N)" >> "{log}"
sleep "0.$(( $(od -An -N1 -tu1 /dev/urandom) % 4 + 1 ))"
case "$1" in
  create) (set -o noclobber; : > "{effects}/$TASKVISOR_PROVIDER-$3") 2>/dev/null || echo "twice $3" >> "{log}" ;;
  delete) (set -o noclobber; : > "{effects}/$TASKVISOR_PROVIDER-$3.del") 2>/dev/null || echo "twice $3" >> "{log}" ;;
esac
echo "end $3 $(date +%s.%N)" >> "{log}"
echo '{{}}'
"""

# The effect file of a create or delete exists exactly when it took effect.
PROBE = """cat >/dev/null
echo "probe $3" >> "{log}"
case "$1" in
  create) f="{effects}/$TASKVISOR_PROVIDER-$3" ;;
  *) f="{effects}/$TASKVISOR_PROVIDER-$3.del" ;;
esac
if [ -e "$f" ]; then echo '{{"outcome": "completed"}}'; else echo '{{"outcome": "not_done"}}'; fi
"""


def test_chaos(tmp_path, redis_server, mariadb_server, start_supervisor):
    locks, effects = tmp_path / "locks", tmp_path / "effects"
    locks.mkdir()
    effects.mkdir()
    log = tmp_path / "runs.log"
    script = write_script(tmp_path / "op.sh", OPERATION.format(locks=locks, log=log, effects=effects))
    probe = write_script(tmp_path / "probe.sh", PROBE.format(log=log, effects=effects))
    providers = {}
    for provider, workers in PROVIDERS.items():
        settings = command_provider(script, concurrent=workers if workers > 1 else 0, kill_grace=0.5)
        settings["driver"]["probes"] = {kind: [probe, kind, "{instance}", "{id}"] for kind in ("create", "delete")}
        settings.update(maxInterruptedRuns=MAX_INTERRUPTED_RUNS, maxRetries={"start": MAX_RETRIES},
                        taskPollInterval=2)  # fmt: skip
        providers[provider] = settings
    supervisor = start_supervisor(providers, database_url=mariadb_server.url, leaseSeconds=3, shutdownGrace=2)
    client = redis_server.client()
    state = TaskState(client, Keys(), 0, 1000, Redactor())

    rng = random.Random(7)
    tasks: dict[str, tuple[str, str, str]] = {}
    for number in range(TASKS_PER_PROVIDER):
        for provider in PROVIDERS:
            kind = rng.choice(IDEMPOTENT * 3 + ("create", "delete"))
            task_id = f"{provider}-{number:03d}"
            instance = f"vm-{rng.randrange(INSTANCES_PER_PROVIDER)}"
            tasks[task_id] = (provider, kind, instance)
            client.xadd(f"taskvisor:{{{provider}}}:tasks",
                        {"id": task_id, "type": kind, "instance": instance, "user": "u"})  # fmt: skip

    cancel_acknowledged: dict[str, float] = {}
    to_cancel = rng.sample(sorted(tasks), 20)
    kills = 0
    began = time.monotonic()
    redis_restarted = mariadb_restarted = False
    while time.monotonic() - began < 40:
        elapsed = time.monotonic() - began
        busy = _busy_workers(client)
        if busy and kills < 15 and rng.random() < 0.5:
            # Half the kills hit a create or delete when one runs, to exercise the probes.
            risky = [pid for pid, task_id in busy if tasks[task_id][1] not in IDEMPOTENT]
            try:
                os.kill(rng.choice(risky if risky and rng.random() < 0.5 else [pid for pid, _ in busy]), signal.SIGKILL)
                kills += 1
            except ProcessLookupError:
                pass
        if to_cancel and rng.random() < 0.5:
            task_id = to_cancel.pop()
            reply = _cancel(state, tasks[task_id][0], task_id)
            if reply in ("cancelled", "cancelling"):
                cancel_acknowledged[task_id] = time.time()
        if elapsed > 5 and not redis_restarted:
            redis_restarted = True
            redis_server.stop()
            time.sleep(1)
            redis_server.start()
        if elapsed > 10 and not mariadb_restarted:
            mariadb_restarted = True
            mariadb_server.stop(kill=True)
            time.sleep(2)
            mariadb_server.start()
        if elapsed > 10 and _all_ended(client, tasks):
            break
        time.sleep(0.4)

    wait_for(lambda: _all_ended(client, tasks), 90, "every task to end in Redis")
    assert kills >= 5
    assert redis_restarted
    assert mariadb_restarted

    lines = log.read_text().splitlines()
    assert [line for line in lines if line.startswith(("overlap", "twice"))] == []
    starts: Counter = Counter()
    start_times: dict[str, list[float]] = defaultdict(list)
    for line in lines:
        word, task_id, *rest = line.split()
        if word == "start":
            starts[task_id] += 1
            start_times[task_id].append(float(rest[0]))
    for task_id, (provider, kind, _instance) in tasks.items():
        allowed = MAX_INTERRUPTED_RUNS + (MAX_RETRIES if kind == "start" else 0)
        if kind in IDEMPOTENT:
            assert starts[task_id] <= allowed, (task_id, starts[task_id])
        else:
            # Run again only after the probe reported that the first run had no effect.
            assert starts[task_id] <= 1 + lines.count(f"probe {task_id}"), task_id
    for task_id, acknowledged in cancel_acknowledged.items():
        assert all(moment < acknowledged + 0.05 for moment in start_times[task_id]), task_id
        assert task_hash(client, tasks[task_id][0], task_id)["status"] in TERMINAL

    # SQL: exactly one row per task, in the same final state as Redis.
    def sql_matches() -> bool:
        connection = mariadb_server.connect()
        try:
            with connection.cursor() as cursor:
                cursor.execute("SELECT id, status FROM taskvisor_tasks")
                rows = dict(cursor.fetchall())
        finally:
            connection.close()
        return rows == {task_id: task_hash(client, provider, task_id)["status"] for task_id, (provider, _, _) in tasks.items()}

    wait_for(sql_matches, 60, "SQL to hold every task's final state", interval=0.5)
    statuses = Counter(task_hash(client, provider, task_id)["status"] for task_id, (provider, _, _) in tasks.items())
    assert statuses["completed"] >= len(tasks) * 0.7, statuses
    assert supervisor.stop() == 0


def _cancel(state: TaskState, provider: str, task_id: str) -> str:
    try:
        reply = state.cancel(provider, task_id, reason="chaos")
    except Exception:  # noqa: BLE001 - Redis may be restarting
        return ""
    if reply[0] == "cancelling":
        state.client.publish("taskvisor:cancel", f"{provider} {task_id}")
        # Acknowledged is when the task reached `cancelled`: the driver was stopped.
        try:
            wait_for(lambda: task_hash(state.client, provider, task_id).get("status") in TERMINAL, 10, "cancel")
        except Exception:  # noqa: BLE001
            return ""
        return "cancelling" if task_hash(state.client, provider, task_id)["status"] == "cancelled" else ""
    return reply[0]


def _all_ended(client, tasks) -> bool:
    try:
        pipe = client.pipeline(transaction=False)
        for task_id, (provider, _, _) in tasks.items():
            pipe.hget(f"taskvisor:{{{provider}}}:task:{task_id}", "status")
        return all(value is not None and value.decode() in TERMINAL for value in pipe.execute())
    except Exception:  # noqa: BLE001 - Redis may be restarting
        return False


def _busy_workers(client) -> list[tuple[int, str]]:
    """(process id, task id) of the workers that run a task now, from the providers' busy hashes."""
    found = []
    try:
        for provider in PROVIDERS:
            for owner, value in client.hgetall(f"taskvisor:{{{provider}}}:busy").items():
                pid = int(owner.decode().rsplit(":", 1)[1])
                if psutil.pid_exists(pid):
                    found.append((pid, value.decode().split(" ", 1)[0]))
    except Exception:  # noqa: BLE001 - Redis may be restarting
        return []
    return found
