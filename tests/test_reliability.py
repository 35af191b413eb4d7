"""Crashes, interrupted runs, poison tasks, retries and the reconciliation pass, on real processes."""

import os
import re
import signal
import socket
import time

import orjson
import psutil

from shared.errors import StoreError
from shared.keys import Keys
from shared.redaction import Redactor
from shared.settings import load_config
from shared.taskstate import TaskState
from supervisor.reconcile import Reconciler
from tests.harness import cli, command_provider, task_hash, wait_for, write_script

STREAM = "taskvisor:{p}:tasks"


def history(client, task_id: str, provider: str = "p") -> list[dict]:
    return [orjson.loads(line) for line in client.lrange(f"taskvisor:{{{provider}}}:history:{task_id}", 0, -1)]


def running_worker_pid(client, task_id: str) -> int:
    owner = wait_for(lambda: task_hash(client, "p", task_id).get("owner"), 10, f"{task_id} to have a worker")
    return int(owner.rsplit(":", 1)[1])


def lines(path) -> list[str]:
    return path.read_text().split() if path.exists() else []


def test_killed_worker_rerun_at_once(tmp_path, redis_server, start_supervisor):
    runs = tmp_path / "runs.log"
    script = write_script(tmp_path / "op.sh", f'cat >/dev/null\necho "$3" >> {runs}\n'
                                              f'[ "$(grep -c "$3" {runs})" = 1 ] && exec sleep 60\necho "{{}}"\n')
    # A lease of 60 s: only the supervisor noticing the exit explains a quick takeover.
    start_supervisor({"p": command_provider(script)}, leaseSeconds=60)
    client = redis_server.client()
    client.xadd(STREAM, {"id": "s-1", "type": "start", "instance": "vm-1", "user": "u"})
    wait_for(lambda: lines(runs) == ["s-1"], 10, "the first run")
    first_owner = task_hash(client, "p", "s-1")["owner"]
    killed_at = time.monotonic()
    os.kill(running_worker_pid(client, "s-1"), signal.SIGKILL)

    wait_for(lambda: task_hash(client, "p", "s-1").get("status") == "completed", 15, "the task to complete")
    assert time.monotonic() - killed_at < 10
    task = task_hash(client, "p", "s-1")
    assert task["attempts"] == "2"
    assert task["interrupted_runs"] == "1"
    assert task["workers"].split(",")[0] == first_owner
    assert len(set(task["workers"].split(","))) == 2
    running_lines = [line for line in history(client, "s-1") if line["status"] == "running"]
    assert [line["worker"] for line in running_lines] == task["workers"].split(",")
    assert lines(runs) == ["s-1", "s-1"]
    assert client.hget("taskvisor:{p}:instances", "vm-1") == b"running"


def test_interrupted_create_without_probe_fails(tmp_path, redis_server, start_supervisor):
    runs = tmp_path / "runs.log"
    script = write_script(tmp_path / "op.sh", f'cat >/dev/null\necho "$1 $3" >> {runs}\n'
                                              f'[ "$1" = create ] && exec sleep 60\necho "{{}}"\n')
    start_supervisor({"p": command_provider(script)}, leaseSeconds=60)
    client = redis_server.client()
    client.xadd(STREAM, {"id": "c-1", "type": "create", "instance": "vm-1", "user": "u"})
    client.xadd(STREAM, {"id": "c-2", "type": "start", "instance": "vm-1", "user": "u"})
    wait_for(lambda: runs.exists(), 10, "the create to run")
    os.kill(running_worker_pid(client, "c-1"), signal.SIGKILL)

    wait_for(lambda: task_hash(client, "p", "c-1").get("status") == "failed", 15, "the create to fail")
    task = task_hash(client, "p", "c-1")
    assert task["error"].startswith("interrupted: its run on test-p-0:")
    assert "a create is not run twice without a probe" in task["error"]
    assert task["attempts"] == "1"
    # The task behind it on the same instance still runs.
    wait_for(lambda: task_hash(client, "p", "c-2").get("status") == "completed", 15, "the start behind it")
    assert runs.read_text().splitlines() == ["create c-1", "start c-2"]
    assert client.hget("taskvisor:{p}:instances", "vm-1") == b"running"
    failed_line = [line for line in history(client, "c-1") if line["status"] == "failed"]
    assert failed_line and failed_line[0]["error"].startswith("interrupted")


def test_probe_decides_interrupted_create(tmp_path, redis_server, start_supervisor):
    runs = tmp_path / "runs.log"
    created = tmp_path / "created"
    created.mkdir()
    # The create makes the instance's file, then hangs; the probe reports from the file.
    script = write_script(tmp_path / "op.sh", f'cat >/dev/null\necho "$1 $3" >> {runs}\n'
                                              f'if [ "$1" = create ]; then\n'
                                              f'  [ "$2" = vm-made ] && touch {created}/$2\n'
                                              f'  [ "$(grep -c "$3" {runs})" = 1 ] && exec sleep 60\n'
                                              f'fi\necho \'{{"instance": "\'$2\'"}}\'\n')
    probe = write_script(tmp_path / "probe.sh", f'cat >/dev/null\necho "probe $3" >> {runs}\n'
                                                f'if [ -e {created}/$2 ]; then echo \'{{"outcome": "completed", '
                                                f'"result": {{"found": "\'$2\'"}}}}\'\n'
                                                f'else echo \'{{"outcome": "not_done"}}\'; fi\n')
    provider = command_provider(script, concurrent=2)
    provider["driver"]["probes"] = {"create": [probe, "create", "{instance}", "{id}"]}
    start_supervisor({"p": provider}, leaseSeconds=60)
    client = redis_server.client()
    client.xadd(STREAM, {"id": "made", "type": "create", "instance": "vm-made", "user": "u"})
    client.xadd(STREAM, {"id": "fresh", "type": "create", "instance": "vm-fresh", "user": "u"})
    wait_for(lambda: len(lines(runs)) >= 4, 10, "both creates to run")
    for task_id in ("made", "fresh"):
        os.kill(running_worker_pid(client, task_id), signal.SIGKILL)

    for task_id in ("made", "fresh"):
        wait_for(lambda t=task_id: task_hash(client, "p", t).get("status") == "completed", 20, f"{task_id} to complete")
    made_task = task_hash(client, "p", "made")
    assert orjson.loads(made_task["result"]) == {"found": "vm-made"}
    assert made_task["message"] == "the interrupted run had completed (probe)"
    log = runs.read_text().splitlines()
    # Found done by the probe: not run again. Found not done: run again after the probe.
    assert log.count("create made") == 1
    assert log.count("probe made") == 1
    assert log.count("create fresh") == 2
    assert log.count("probe fresh") == 1
    assert log.index("probe fresh") < len(log) - 1 - log[::-1].index("create fresh")
    assert orjson.loads(task_hash(client, "p", "fresh")["result"]) == {"instance": "vm-fresh"}


def test_poison_task_dead_lettered(tmp_path, redis_server, start_supervisor):
    runs = tmp_path / "runs.log"
    # The poison task kills the worker that runs it ($PPID is the worker process).
    script = write_script(tmp_path / "op.sh", f'cat >/dev/null\necho "$3" >> {runs}\n'
                                              f'[ "$3" = poison ] && kill -9 $PPID && sleep 5\necho "{{}}"\n')
    provider = command_provider(script, concurrent=2)
    provider["maxInterruptedRuns"] = 2
    start_supervisor({"p": provider}, leaseSeconds=60)
    client = redis_server.client()
    client.xadd(STREAM, {"id": "poison", "type": "restart", "instance": "vm-1", "user": "u"})
    client.xadd(STREAM, {"id": "behind", "type": "stop", "instance": "vm-1", "user": "u"})
    for index in range(4):
        client.xadd(STREAM, {"id": f"other-{index}", "type": "start", "instance": f"vm-{index + 2}", "user": "u"})

    wait_for(lambda: task_hash(client, "p", "poison").get("status") == "failed", 30, "the poison task to fail")
    task = task_hash(client, "p", "poison")
    assert task["error"].startswith("poison: its worker died during 2 runs")
    assert lines(runs).count("poison") == 2
    dead = client.xrange("taskvisor:{p}:dead")
    assert len(dead) == 1
    assert dead[0][1][b"reason"].decode().startswith("poison:")
    assert orjson.loads(dead[0][1][b"fields"])["id"] == "poison"
    for task_id in ["behind"] + [f"other-{index}" for index in range(4)]:
        wait_for(lambda t=task_id: task_hash(client, "p", t).get("status") == "completed", 20, f"{task_id} to complete")
    assert client.hget("taskvisor:{p}:instances", "vm-1") == b"stopped"


def test_retries_back_off_in_order(tmp_path, redis_server, start_supervisor):
    runs = tmp_path / "runs.log"
    # `flaky` fails on its first two runs. `broken` fails for good and prints that a retry cannot help.
    script = write_script(tmp_path / "op.sh", f'cat >/dev/null\necho "$3 $(date +%s.%N)" >> {runs}\n'
                                              f'if [ "$3" = flaky ] && [ "$(grep -c "^flaky " {runs})" -le 2 ]; then\n'
                                              f'  echo "host busy" >&2; exit 1; fi\n'
                                              f'if [ "$3" = broken ]; then echo \'{{"retry": false}}\'; exit 1; fi\n'
                                              f'echo "{{}}"\n')
    provider = command_provider(script, concurrent=2)
    provider.update(maxRetries={"start": 3}, retryBackoffBase=0.3, retryBackoffCap=0.5)
    start_supervisor({"p": provider})
    client = redis_server.client()
    client.xadd(STREAM, {"id": "flaky", "type": "start", "instance": "vm-1", "user": "u"})
    client.xadd(STREAM, {"id": "after", "type": "stop", "instance": "vm-1", "user": "u"})
    client.xadd(STREAM, {"id": "broken", "type": "start", "instance": "vm-2", "user": "u"})

    wait_for(lambda: task_hash(client, "p", "after").get("status") == "completed", 20, "the task after the retries")
    flaky = task_hash(client, "p", "flaky")
    assert flaky["status"] == "completed"
    assert (flaky["attempts"], flaky["retries"]) == ("3", "2")
    starts = [(line.split()[0], float(line.split()[1])) for line in runs.read_text().splitlines()]
    flaky_times = [moment for name, moment in starts if name == "flaky"]
    assert flaky_times[1] - flaky_times[0] >= 0.3
    assert flaky_times[2] - flaky_times[1] >= 0.5
    # The instance's later task waited for the retries.
    assert [name for name, _ in starts if name in ("flaky", "after")] == ["flaky", "flaky", "flaky", "after"]
    waits = [line for line in history(client, "flaky") if line["status"] == "pending" and line.get("error")]
    assert [line["message"] for line in waits] == ["failed; automatic retry 1 of 3 in 0.3 s",
                                                   "failed; automatic retry 2 of 3 in 0.5 s"]
    assert "host busy" in waits[0]["error"]
    broken = task_hash(client, "p", "broken")
    assert (broken["status"], broken["attempts"]) == ("failed", "1")


def test_manual_retry_keeps_history(tmp_path, redis_server, start_supervisor):
    marker = tmp_path / "fixed"
    script = write_script(tmp_path / "op.sh", f'cat >/dev/null\n[ "$3" = ok ] || [ -e {marker} ] || {{ echo "no image" >&2; exit 1; }}\n'
                                              f'echo "{{}}"\n')
    supervisor = start_supervisor({"p": command_provider(script)})
    client = redis_server.client()
    client.xadd(STREAM, {"id": "r-1", "type": "create", "instance": "vm-1", "user": "u", "data": '{"image": "x"}'})
    client.xadd(STREAM, {"id": "r-2", "type": "reset-password", "instance": "vm-2", "user": "u",
                         "data": '{"password": "hunter2"}'})
    client.xadd(STREAM, {"id": "ok", "type": "start", "instance": "vm-3", "user": "u"})
    for task_id in ("r-1", "r-2"):
        wait_for(lambda t=task_id: task_hash(client, "p", t).get("status") == "failed", 10, f"{task_id} to fail")
    marker.touch()

    done = cli(supervisor.config_path, "retry", "r-1", "--wait", "15")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "r-1 completed"
    task = task_hash(client, "p", "r-1")
    assert (task["attempts"], task["manual_retries"]) == ("2", "1")
    assert [line["status"] for line in history(client, "r-1")] == [
        "pending", "running", "failed", "pending", "running", "completed"]

    secret = cli(supervisor.config_path, "retry", "r-2")
    assert secret.returncode == 1
    assert "its data held secret fields (password)" in secret.stderr
    wait_for(lambda: task_hash(client, "p", "ok").get("status") == "completed", 10, "the start")
    finished = cli(supervisor.config_path, "retry", "ok")
    assert finished.returncode == 1
    assert "task 'ok' is completed: only failed, timeout or cancelled tasks can be retried" in finished.stderr
    missing = cli(supervisor.config_path, "retry", "nope")
    assert missing.returncode == 1
    assert "task 'nope' not found" in missing.stderr


def start_long_task(tmp_path, redis_server, start_supervisor, task_id: str, task_type: str, shutdown_grace: float):
    """Start a supervisor and one task whose command sleeps 60 s. Returns the supervisor, a Redis client and the file of runs."""
    runs = tmp_path / "runs.log"
    script = write_script(tmp_path / "op.sh", f'cat >/dev/null\necho "$1 $3" >> {runs}\nexec sleep 60\n')
    supervisor = start_supervisor({"p": command_provider(script, kill_grace=0.5)}, shutdownGrace=shutdown_grace)
    client = redis_server.client()
    client.xadd(STREAM, {"id": task_id, "type": task_type, "instance": "vm-1", "user": "u"})
    wait_for(lambda: runs.exists(), 10, f"the {task_type} to run")
    return supervisor, client, runs


def test_create_stopped_by_shutdown_fails(tmp_path, redis_server, start_supervisor):
    supervisor, client, runs = start_long_task(tmp_path, redis_server, start_supervisor, "c-1", "create", 0.5)
    assert supervisor.stop() == 0
    task = task_hash(client, "p", "c-1")
    assert (task["status"], task["interrupted"]) == ("pending", "1")
    assert "task run stopped by shutdown; back to pending task_id=c-1 provider=p type=create" in supervisor.log()
    assert "task ended task_id=c-1" not in supervisor.log()

    supervisor.start()
    wait_for(lambda: task_hash(client, "p", "c-1").get("status") == "failed", 15, "the create to fail")
    assert "is not run twice without a probe" in task_hash(client, "p", "c-1")["error"]
    assert runs.read_text().splitlines() == ["create c-1"]
    assert client.hget("taskvisor:{p}:instances", "vm-1") == b"error"


def test_second_stop_signal_skips_grace(tmp_path, redis_server, start_supervisor):
    supervisor, client, _runs = start_long_task(tmp_path, redis_server, start_supervisor, "s-1", "restart", 60)
    began = time.monotonic()
    supervisor.process.send_signal(signal.SIGTERM)
    wait_for(lambda: "stopping workers count=1 grace=60s" in supervisor.log(), 10, "the graceful stop to begin")
    assert supervisor.stop(signal.SIGTERM) == 0
    # The grace of 60 s was cut short by the second signal.
    assert time.monotonic() - began < 20
    log_text = supervisor.log()
    assert "second stop signal; not waiting for running tasks to finish" in log_text
    assert "stopping running tasks now and returning them to pending" in log_text
    assert "grace period over" not in log_text
    assert task_hash(client, "p", "s-1")["status"] == "pending"
    # The stopped run is not counted as a task done: the task runs again after a restart.
    assert re.search(r"worker stopped provider=p pid=\d+ tasks_done=0\b", log_text)


def test_supervisor_killed_loses_nothing(tmp_path, redis_server, start_supervisor):
    runs = tmp_path / "runs.log"
    script = write_script(tmp_path / "op.sh", f'cat >/dev/null\necho "$3" >> {runs}\nsleep 0.4\necho "{{}}"\n')
    supervisor = start_supervisor({"p": command_provider(script, concurrent=3)}, leaseSeconds=60)
    client = redis_server.client()
    ids = [f"t-{index:02d}" for index in range(18)]
    for index, task_id in enumerate(ids):
        client.xadd(STREAM, {"id": task_id, "type": "restart", "instance": f"vm-{index % 6}", "user": "u"})
    wait_for(lambda: len(lines(runs)) >= 4, 10, "a few tasks to run")
    # Everything at once, as when a container or its cgroup is killed: no worker finishes its task.
    supervisor.kill_all()

    restarted_at = time.monotonic()
    supervisor.start()
    wait_for(lambda: all(task_hash(client, "p", t).get("status") == "completed" for t in ids), 30, "every task")
    # With leases of 60 s, this is only possible because the restart released the old workers' leases.
    assert time.monotonic() - restarted_at < 20
    assert sorted(set(lines(runs))) == ids
    assert "lease of a dead worker released" in supervisor.log()
    # The killed supervisor's status record had not expired yet, and was replaced at once.
    assert "status record of a dead supervisor with this name replaced name=test" in supervisor.log()


def test_two_supervisors_share_limit(tmp_path, redis_server, sqlite_url):
    from tests.harness import SupervisorProcess

    running = tmp_path / "running"
    running.mkdir()
    peaks = tmp_path / "peaks.log"
    done = tmp_path / "done.log"
    # Each run counts the runs in progress (one file each) and records the count it saw.
    script = write_script(tmp_path / "op.sh", f'cat >/dev/null\ntouch {running}/$3\nls {running} | wc -l >> {peaks}\n'
                                              f'sleep 0.3\nrm {running}/$3\necho "$3" >> {done}\necho "{{}}"\n')
    providers = {"p": command_provider(script, concurrent=2)}
    supervisors = []
    for name in ("alpha", "beta"):
        folder = tmp_path / name
        folder.mkdir()
        supervisors.append(SupervisorProcess(folder, redis_server.url, sqlite_url, providers, name=name, leaseSeconds=4))
    try:
        for supervisor in supervisors:
            supervisor.start()
        client = redis_server.client()
        ids = [f"t-{index:02d}" for index in range(24)]
        for index, task_id in enumerate(ids):
            client.xadd(STREAM, {"id": task_id, "type": "restart", "instance": f"vm-{index % 8}", "user": "u"})
        wait_for(lambda: len(lines(done)) >= 6, 20, "some tasks to end")

        def alpha_holds_entries() -> bool:
            consumers = client.xpending(STREAM, "workers")["consumers"] or []
            return any(item["name"].startswith(b"alpha-") and item["pending"] for item in consumers)

        wait_for(alpha_holds_entries, 10, "alpha's workers to hold entries")
        alpha = supervisors[0]
        family = psutil.Process(alpha.process.pid).children(recursive=True)
        alpha.process.kill()
        psutil.wait_procs(family, timeout=10)
        wait_for(lambda: all(task_hash(client, "p", t).get("status") == "completed" for t in ids), 40, "every task")
        assert max(int(value) for value in lines(peaks)) <= 2
        assert sorted(set(lines(done))) == ids
        assert not alpha_holds_entries()
    finally:
        for supervisor in supervisors:
            supervisor.kill_all()


def test_same_name_supervisor_rejected(tmp_path, redis_server, sqlite_url, start_supervisor):
    from tests.harness import SupervisorProcess

    script = write_script(tmp_path / "op.sh", 'cat >/dev/null\necho "{}"\n')
    providers = {"p": command_provider(script)}
    first = start_supervisor(providers)
    client = redis_server.client()
    wait_for(lambda: "supervisor started" in first.log(), 15, "the first supervisor to start")
    key = "taskvisor:supervisor:test"
    token = orjson.loads(client.get(key))["token"]

    folder = tmp_path / "second"
    folder.mkdir()
    second = SupervisorProcess(folder, redis_server.url, sqlite_url, providers)
    second.start()
    try:
        assert second.process.wait(15) == 1
    finally:
        second.kill_all()
    message = (
        f"supervisor name 'test' is in use by a running supervisor (pid {first.process.pid} on host "
        f"{socket.gethostname()}), which keeps writing {key}"
    )
    assert message in second.log()
    assert "give each supervisor its own supervisor.name in its config" in second.log()
    assert "supervisor started" not in second.log()
    # The first one goes on, and its record is still its own.
    assert first.process.poll() is None
    assert orjson.loads(client.get(key))["token"] == token
    client.xadd(STREAM, {"id": "after", "type": "start", "instance": "vm-1", "user": "u"})
    wait_for(lambda: task_hash(client, "p", "after").get("status") == "completed", 15, "a task after the refusal")


def test_stale_same_name_record_awaited(tmp_path, redis_server, start_supervisor):
    client = redis_server.client()
    key = "taskvisor:supervisor:test"
    # Left by a supervisor that died on another host, so it is not written again.
    stale = {"name": "test", "pid": 4242, "host": "elsewhere", "token": "gone", "updated_at": time.time()}
    client.set(key, orjson.dumps(stale), px=1500)
    script = write_script(tmp_path / "op.sh", 'cat >/dev/null\necho "{}"\n')
    supervisor = start_supervisor({"p": command_provider(script)})
    wait_for(lambda: "supervisor started" in supervisor.log(), 15, "the supervisor to start after the record expired")
    log_text = supervisor.log()
    assert "waiting for the status record of an earlier supervisor with this name to expire" in log_text
    assert "old_pid=4242 old_host=elsewhere" in log_text
    assert orjson.loads(client.get(key))["token"] != "gone"


def test_reconcile_overdue_and_instances(tmp_path, redis_server):
    config_path = tmp_path / "taskvisor.yaml"
    config_path.write_text(
        f"redis: {{url: '{redis_server.url}'}}\nsupervisor: {{name: test, leaseSeconds: 3}}\n"
        "providers:\n  p:\n    driver: {type: command, killGrace: 1, commands: {start: [/bin/true]}}\n"
    )
    config = load_config(config_path)
    client = redis_server.client()
    state = TaskState(client, Keys(), 0, 1000, Redactor())
    from shared.schema import parse_entry

    entry = client.xadd(STREAM, {"id": "stuck", "type": "start", "instance": "vm-1", "user": "u", "timeout": "5"})
    client.xgroup_create(STREAM, "workers", id="0")
    client.xreadgroup("workers", "other-p-0", {STREAM: ">"})
    spec = parse_entry("p", entry.decode(), {b"id": b"stuck", b"type": b"start", b"instance": b"vm-1", b"user": b"u",
                                            b"timeout": b"5"})
    # A worker of another host that holds its lease but never ends the task.
    assert state.start(spec, 5, "other-p-0:4242", 600_000).outcome == "ok"
    client.hset("taskvisor:{p}:task:stuck", "started_at", f"{time.time() - 60:.6f}")
    client.hset("taskvisor:{p}:instances", mapping={"vm-1": "starting", "vm-2": "stopping", "vm-3": "running"})

    counts = Reconciler(config, state).run_pass("p", config.providers["p"])
    assert counts["expired"] == 1
    task = task_hash(client, "p", "stuck")
    assert task["status"] == "timeout"
    assert task["error"].startswith("overdue: its worker other-p-0:4242 did not end it within its timeout of 5 s")
    assert client.xlen(STREAM) == 0
    assert client.hget("taskvisor:{p}:instances", "vm-1") == b"stopped"
    # vm-2 was stopping with no task at all, so its real state is unknown.
    assert counts["repaired"] == 1
    assert client.hget("taskvisor:{p}:instances", "vm-2") == b"error"
    assert client.hget("taskvisor:{p}:instances", "vm-3") == b"running"
    repair_events = [fields for _id, fields in client.xrange("taskvisor:{p}:events") if fields.get(b"id") == b""]
    assert repair_events[0][b"instance"] == b"vm-2"
    assert repair_events[0][b"instance_status"] == b"error"
    assert Reconciler(config, state).run_pass("p", config.providers["p"])["repaired"] == 0


def test_events_trimmed_after_all_groups(tmp_path, redis_server, start_supervisor, sqlite_url):
    script = write_script(tmp_path / "op.sh", 'cat >/dev/null\necho "{}"\n')
    client = redis_server.client()
    events = "taskvisor:{p}:events"
    client.xgroup_create(events, "panel", id="0", mkstream=True)
    supervisor = start_supervisor({"p": command_provider(script, concurrent=2)}, redis_options={"eventsRetention": 0})
    ids = [f"e-{index}" for index in range(10)]
    for task_id in ids:
        client.xadd(STREAM, {"id": task_id, "type": "start", "instance": task_id, "user": "u"})
    wait_for(lambda: all(task_hash(client, "p", t).get("status") == "completed" for t in ids), 15, "every task")
    from shared.store import open_store

    def mirrored() -> bool:
        store = open_store(sqlite_url)
        try:
            return all((store.get_task(t) or {}).get("status") == "completed" for t in ids)
        finally:
            store.close()

    wait_for(mirrored, 15, "every task in SQL")
    # A trim ran after the mirror wrote everything, but the panel group has read nothing.
    trims = supervisor.log().count("event streams trimmed")
    wait_for(lambda: supervisor.log().count("event streams trimmed") > trims, 10, "a trim after the writes")
    assert client.xlen(events) == 30
    panel = client.xreadgroup("panel", "panel-1", {events: ">"}, count=100)
    client.xack(events, "panel", *[entry_id for entry_id, _ in panel[0][1]])

    def trimmed() -> bool:
        # Events of the newest millisecond stay until a later event arrives: one of them
        # may have been added after the groups' last read.
        millis = {entry_id.split(b"-")[0] for entry_id, _ in client.xrange(events)}
        return len(millis) == 1

    wait_for(trimmed, 20, "the event stream to be trimmed")
    assert client.xlen(events) < 30


def test_redis_restart_resumes_within_seconds(tmp_path, redis_server, start_supervisor):
    script = write_script(tmp_path / "op.sh", 'cat >/dev/null\n[ "$1" = create ] && exec sleep 60\necho "{}"\n')
    supervisor = start_supervisor({"p": command_provider(script, concurrent=2)})
    client = redis_server.client()
    client.xadd(STREAM, {"id": "before", "type": "start", "instance": "vm-1", "user": "u"})
    wait_for(lambda: task_hash(client, "p", "before").get("status") == "completed", 10, "the first task")

    redis_server.stop()
    wait_for(lambda: "redis unavailable" in supervisor.log(), 10, "the outage to be logged")
    redis_server.start()
    restarted_at = time.monotonic()
    client = redis_server.client()
    client.xadd(STREAM, {"id": "after", "type": "start", "instance": "vm-1", "user": "u"})
    wait_for(lambda: task_hash(client, "p", "after").get("status") == "completed", 15, "a task after the restart")
    assert time.monotonic() - restarted_at < 15

    # The cancel listener and the config listener work again.
    client.xadd(STREAM, {"id": "long", "type": "create", "instance": "vm-2", "user": "u"})
    wait_for(lambda: task_hash(client, "p", "long").get("status") == "running", 10, "the long task")
    client.hset("taskvisor:{p}:task:long", mapping={"cancel_request_user": "*", "cancel_request_reason": "test"})
    client.publish("taskvisor:cancel", "p long")
    wait_for(lambda: task_hash(client, "p", "long").get("status") == "cancelled", 10, "the cancel after the restart")
    assert cli(supervisor.config_path, "provider", "set", "p", "maxConcurrentTasks=3").returncode == 0
    wait_for(lambda: "provider resized provider=p workers=2->3" in supervisor.log(), 10, "the resize to be applied")
    # Reconnection backs off: a few warnings per process, not a tight loop.
    assert supervisor.log().count("redis unavailable") < 60


def test_redis_emptied_recreates_groups(tmp_path, redis_server, start_supervisor):
    script = write_script(tmp_path / "op.sh", 'cat >/dev/null\necho "{}"\n')
    supervisor = start_supervisor({"p": command_provider(script, concurrent=2)})
    client = redis_server.client()
    client.xadd(STREAM, {"id": "before", "type": "start", "instance": "vm-1", "user": "u"})
    wait_for(lambda: task_hash(client, "p", "before").get("status") == "completed", 10, "the first task")

    client.flushall()
    flushed_at = time.monotonic()
    ids = [f"after-{index}" for index in range(4)]
    for task_id in ids:
        client.xadd(STREAM, {"id": task_id, "type": "stop", "instance": task_id, "user": "u"})
    wait_for(lambda: all(task_hash(client, "p", t).get("status") == "completed" for t in ids), 20, "tasks after the flush")
    assert time.monotonic() - flushed_at < 20
    assert "consumer group missing, creating it" in supervisor.log()
    assert "child process crashed" not in supervisor.log()
    warnings = [line for line in supervisor.log().splitlines() if " WARNING " in line or " ERROR " in line]
    assert len(warnings) < 40, warnings[-10:]


def test_rejected_entry_recorded_as_failed(tmp_path, redis_server, start_supervisor, sqlite_url):
    script = write_script(tmp_path / "op.sh", 'cat >/dev/null\n[ "$3" = first ] && sleep 2\necho "{}"\n')
    supervisor = start_supervisor({"p": command_provider(script, concurrent=2)})
    client = redis_server.client()
    client.xadd(STREAM, {"id": "first", "type": "start", "instance": "vm-1", "user": "u"})
    wait_for(lambda: task_hash(client, "p", "first").get("status") == "running", 10, "the first task")
    client.xadd(STREAM, {"id": "bad-type", "type": "boot", "instance": "vm-2", "user": "u"})
    no_id_entry = client.xadd(STREAM, {"type": "start", "instance": "vm-3"}).decode()
    client.xadd(STREAM, {"id": "first", "type": "stop", "instance": "vm-1", "user": "mallory"})
    client.xadd(STREAM, {"id": "bad id!", "type": "start", "instance": "vm-4", "user": "u"})
    client.xadd(STREAM, {"id": "after", "type": "start", "instance": "vm-5", "user": "u"})

    wait_for(lambda: client.xlen("taskvisor:{p}:dead") == 4, 10, "four dead letters")
    bad_type = task_hash(client, "p", "bad-type")
    assert bad_type["status"] == "failed"
    assert bad_type["error"].startswith("rejected: field 'type' has unknown value 'boot'")
    assert (bad_type["type"], bad_type["instance"], bad_type["user"]) == ("boot", "vm-2", "u")
    derived = task_hash(client, "p", f"p:{no_id_entry}")
    assert derived["status"] == "failed"
    assert derived["error"] == "rejected: field 'user' is missing: expected the id of the user who requested the task"
    # The duplicate id changed nothing of the first task, and an unreadable id made no task.
    wait_for(lambda: task_hash(client, "p", "first").get("status") == "completed", 10, "the first task to end")
    assert task_hash(client, "p", "first")["user"] == "u"
    assert task_hash(client, "p", "bad id!") == {}
    wait_for(lambda: task_hash(client, "p", "after").get("status") == "completed", 10, "the task behind them")

    from shared.store import open_store

    def rejected_row():
        store = open_store(sqlite_url)
        try:
            return store.get_task("bad-type")
        finally:
            store.close()

    row = wait_for(rejected_row, 10, "the rejected task in SQL")
    assert row["status"] == "failed"
    assert row["error_message"].startswith("rejected: field 'type'")
    refused = cli(supervisor.config_path, "retry", "bad-type")
    assert refused.returncode == 1
    assert "its entry was rejected (field 'type' has unknown value 'boot'" in refused.stderr


def test_unknown_provider_entries_rejected(tmp_path, redis_server):
    config_path = tmp_path / "taskvisor.yaml"
    config_path.write_text(
        f"redis: {{url: '{redis_server.url}'}}\nsupervisor: {{name: test}}\n"
        "providers:\n  p:\n    driver: {type: command, commands: {start: [/bin/true]}}\n"
    )
    config = load_config(config_path)
    client = redis_server.client()
    state = TaskState(client, Keys(), 0, 1000, Redactor())
    old_id = f"{int((time.time() - 600) * 1000)}-0"
    client.xadd("taskvisor:{ghost}:tasks", {"id": "g-1", "type": "start", "instance": "vm-1", "user": "u"}, id=old_id)
    client.xadd("taskvisor:{ghost}:tasks", {"id": "g-2", "type": "start", "instance": "vm-1", "user": "u"})
    client.xadd("taskvisor:{added}:tasks", {"id": "a-1", "type": "start", "instance": "vm-1", "user": "u"}, id=old_id)
    client.sadd("taskvisor:providers", "added")

    assert Reconciler(config, state).reject_unknown_provider_entries(config.providers) == 1
    task = task_hash(client, "ghost", "g-1")
    assert task["status"] == "failed"
    assert task["error"].startswith("rejected: unknown provider 'ghost': no running supervisor has it")
    dead = client.xrange("taskvisor:{ghost}:dead")
    assert [fields[b"entry"].decode() for _id, fields in dead] == [old_id]
    # A young entry may still get its provider, and a provider added in Redis is known.
    assert client.xlen("taskvisor:{ghost}:tasks") == 1
    assert client.xlen("taskvisor:{added}:tasks") == 1


def test_workers_killed_together_all_rerun(tmp_path, redis_server, start_supervisor):
    runs = tmp_path / "runs.log"
    script = write_script(tmp_path / "op.sh", f'cat >/dev/null\necho "$3" >> {runs}\n'
                                              f'[ "$(grep -c "$3" {runs})" = 1 ] && exec sleep 60\necho "{{}}"\n')
    start_supervisor({"p": command_provider(script, concurrent=3)}, leaseSeconds=60)
    client = redis_server.client()
    ids = ["k-1", "k-2", "k-3"]
    for task_id in ids:
        client.xadd(STREAM, {"id": task_id, "type": "restart", "instance": task_id, "user": "u"})
    wait_for(lambda: sorted(lines(runs)) == ids, 10, "three runs")
    pids = [running_worker_pid(client, task_id) for task_id in ids]
    killed_at = time.monotonic()
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
        # Deaths a few milliseconds apart: a later one can be reaped while the supervisor
        # cleans up after an earlier one.
        time.sleep(0.005)

    wait_for(lambda: all(task_hash(client, "p", t).get("status") == "completed" for t in ids), 15, "every task")
    # With leases of 60 s, only the supervisor releasing every dead worker's lease explains this.
    assert time.monotonic() - killed_at < 10
    assert [task_hash(client, "p", t)["attempts"] for t in ids] == ["2", "2", "2"]


def test_bulk_retry_by_status(tmp_path, redis_server, start_supervisor, sqlite_url):
    marker = tmp_path / "fixed"
    script = write_script(tmp_path / "op.sh", f'cat >/dev/null\n[ "$3" = ok ] || [ -e {marker} ] || exit 1\necho "{{}}"\n')
    supervisor = start_supervisor({"p": command_provider(script, concurrent=2)})
    client = redis_server.client()
    ids = [f"b-{index}" for index in range(3)]
    for task_id in ids + ["ok"]:
        client.xadd(STREAM, {"id": task_id, "type": "start", "instance": task_id, "user": "u"})
    from shared.store import open_store

    def failed_in_sql() -> bool:
        store = open_store(sqlite_url)
        try:
            return all((store.get_task(t) or {}).get("status") == "failed" for t in ids)
        except StoreError:
            return False  # the supervisor has not created the tables yet
        finally:
            store.close()

    wait_for(failed_in_sql, 15, "three failed tasks in SQL")
    dry = cli(supervisor.config_path, "retry", "--status", "failed", "--provider", "p", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.strip() == "3 of 3 tasks would be queued again; 0 refused"
    assert task_hash(client, "p", "b-0")["status"] == "failed"

    marker.touch()
    bulk = cli(supervisor.config_path, "retry", "--status", "failed", "--provider", "p")
    assert bulk.returncode == 0, bulk.stderr
    assert bulk.stdout.strip() == "3 of 3 tasks queued again; 0 refused"
    wait_for(lambda: all(task_hash(client, "p", t).get("status") == "completed" for t in ids), 15, "the retried tasks")

    mixed = cli(supervisor.config_path, "retry", "ok", "nope")
    assert mixed.returncode == 1
    assert mixed.stdout.strip() == "0 of 2 tasks queued again; 2 refused"
    assert "refused: task 'ok' is completed" in mixed.stderr
    both = cli(supervisor.config_path, "retry", "b-0", "--status", "failed")
    assert both.returncode == 1
    assert "give task ids or filters" in both.stderr


def test_record_without_expiry_rejected(tmp_path, redis_server):
    from tests.harness import SupervisorProcess

    client = redis_server.client()
    key = "taskvisor:supervisor:test"
    client.set(key, orjson.dumps({"name": "test", "pid": 4242, "host": "elsewhere", "token": "kept"}))
    script = write_script(tmp_path / "op.sh", 'cat >/dev/null\necho "{}"\n')
    supervisor = SupervisorProcess(tmp_path, redis_server.url, f"sqlite:///{tmp_path / 'db.sqlite'}", {"p": command_provider(script)})
    supervisor.start()
    try:
        assert supervisor.process.wait(20) == 1
    finally:
        supervisor.kill_all()
    assert f"the status record {key} of supervisor name 'test' did not expire within 7 s" in supervisor.log()
    assert f"delete it (redis-cli DEL {key}) and start again" in supervisor.log()
