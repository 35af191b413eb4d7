"""Workers run at a lower CPU priority than the supervisor's own processes."""

import os
import re

import psutil

from tests.harness import command_provider, task_hash, wait_for, write_script


def logged_pid(log: str, start: str) -> int | None:
    match = re.search(re.escape(start) + r".* pid=(\d+)", log)
    return int(match.group(1)) if match else None


def test_workers_run_below_supervisor_priority(start_supervisor, redis_server, tmp_path):
    # The task's command writes the nice level it runs at.
    niceness_file = tmp_path / "niceness.txt"
    script = write_script(tmp_path / "op.sh", f'cat >/dev/null\nnice > {niceness_file}\necho "{{}}"\n')
    supervisor = start_supervisor({"p": command_provider(script)}, workerNice=3)
    base = os.getpriority(os.PRIO_PROCESS, 0)

    client = redis_server.client()
    client.xadd("taskvisor:{p}:tasks", {"id": "n-1", "type": "start", "instance": "vm-1", "user": "u"})
    wait_for(lambda: task_hash(client, "p", "n-1").get("status") == "completed", 15, "the task to complete")
    assert int(niceness_file.read_text()) == min(base + 3, 19)

    log = supervisor.log()
    worker = logged_pid(log, "worker started provider=p")
    assert worker is not None, log
    assert psutil.Process(worker).nice() == min(base + 3, 19)
    # The supervisor's own processes keep its priority.
    for start in ("mirror started", "intake started"):
        pid = logged_pid(log, start)
        assert pid is not None, log
        assert psutil.Process(pid).nice() == base, start
    assert psutil.Process(supervisor.process.pid).nice() == base
