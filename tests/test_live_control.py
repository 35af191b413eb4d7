"""Provider settings changed while the supervisor runs: resize, pause, add, remove, reload."""

import os
import signal
import subprocess
import sys
import time

import orjson
import psutil
import pytest
import yaml

from tests.harness import REPO, SupervisorProcess, command_provider, task_hash, wait_for, write_script


def cli(config_path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), TASKVISOR_CONFIG=str(config_path))
    return subprocess.run([sys.executable, "-m", "supervisor", *args], capture_output=True, text=True, env=env, timeout=60)


def provider_rows(config_path) -> dict[str, dict]:
    result = cli(config_path, "provider", "list", "--json")
    assert result.returncode == 0, result.stderr
    return {row["provider"]: row for row in map(orjson.loads, result.stdout.splitlines())}


def worker_processes(supervisor: SupervisorProcess) -> list[psutil.Process]:
    """Return the supervisor's worker children (every child but the intake and the mirror)."""
    children = psutil.Process(supervisor.process.pid).children()
    return [child for child in children if child.status() != psutil.STATUS_ZOMBIE][2:] if len(children) > 2 else []


def running_count(log_path) -> int:
    if not log_path.exists():
        return 0
    running = 0
    for line in log_path.read_text().splitlines():
        running += 1 if line.startswith("start") else -1
    return running


@pytest.fixture
def slow_script(tmp_path):
    log_path = tmp_path / "runs.log"
    script = write_script(
        tmp_path / "op.sh",
        f'cat >/dev/null\necho "start $3" >> {log_path}\nsleep "${{SLEEP:-1}}"\necho "end $3" >> {log_path}\necho "{{}}"\n',
    )
    return script, log_path


def push_backlog(client, provider: str, count: int, prefix: str = "t") -> list[str]:
    ids = [f"{prefix}-{index}" for index in range(count)]
    for index, task_id in enumerate(ids):
        client.xadd(f"taskvisor:{{{provider}}}:tasks", {"id": task_id, "type": "restart", "instance": f"vm-{index}", "user": "u"})
    return ids


def test_grow_during_backlog(start_supervisor, redis_server, slow_script):
    script, log_path = slow_script
    supervisor = start_supervisor({"p": command_provider(script)})
    client = redis_server.client()
    push_backlog(client, "p", 24)
    wait_for(lambda: running_count(log_path) == 1, 10, "the first task to run")

    began = time.monotonic()
    result = cli(supervisor.config_path, "provider", "set", "p", "allowConcurrentTasks=true", "maxConcurrentTasks=4")
    assert result.returncode == 0, result.stderr
    assert "workers: 4" in result.stdout
    wait_for(lambda: running_count(log_path) == 4, 5, "four tasks running at once")
    assert time.monotonic() - began < 2.0
    assert provider_rows(supervisor.config_path)["p"]["target"] == 4


def test_shrink_lets_running_tasks_finish(start_supervisor, redis_server, slow_script):
    script, log_path = slow_script
    supervisor = start_supervisor({"p": command_provider(script, concurrent=4)})
    client = redis_server.client()
    ids = push_backlog(client, "p", 4)
    wait_for(lambda: running_count(log_path) == 4, 10, "four running tasks")

    assert cli(supervisor.config_path, "provider", "set", "p", "maxConcurrentTasks=1").returncode == 0
    wait_for(lambda: all(task_hash(client, "p", t).get("status") == "completed" for t in ids), 10, "all four to complete")
    assert all(task_hash(client, "p", t)["attempts"] == "1" for t in ids)
    wait_for(lambda: len(worker_processes(supervisor)) == 1, 5, "one worker left")
    rows = provider_rows(supervisor.config_path)
    assert (rows["p"]["target"], rows["p"]["workers"], rows["p"]["retiring"]) == (1, 1, 0)
    family = psutil.Process(supervisor.process.pid).children(recursive=True)
    assert supervisor.stop() == 0
    assert [proc.pid for proc in family if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE] == []


def test_rapid_resizes_settle_on_last(start_supervisor, redis_server, slow_script):
    script, log_path = slow_script
    supervisor = start_supervisor({"p": command_provider(script)})
    client = redis_server.client()
    ids = push_backlog(client, "p", 12)
    wait_for(lambda: running_count(log_path) == 1, 10, "the first task to run")
    for size in ("4", "1", "4", "0", "4"):
        assert cli(supervisor.config_path, "provider", "set", "p", "allowConcurrentTasks=true", f"maxConcurrentTasks={size}").returncode == 0
    wait_for(lambda: len(worker_processes(supervisor)) == 4, 5, "four workers")
    wait_for(lambda: all(task_hash(client, "p", t).get("status") == "completed" for t in ids), 20, "the backlog")
    rows = provider_rows(supervisor.config_path)
    assert (rows["p"]["workers"], rows["p"]["retiring"]) == (4, 0)
    assert len(worker_processes(supervisor)) == 4
    assert all(task_hash(client, "p", t)["attempts"] == "1" for t in ids)
    peak = running = 0
    for line in log_path.read_text().splitlines():
        running += 1 if line.startswith("start") else -1
        peak = max(peak, running)
    assert peak <= 4


def test_pause_and_resume(start_supervisor, redis_server, slow_script):
    script, log_path = slow_script
    supervisor = start_supervisor({"p": command_provider(script, concurrent=2)})
    client = redis_server.client()
    result = cli(supervisor.config_path, "provider", "pause", "p")
    assert result.returncode == 0
    wait_for(lambda: len(worker_processes(supervisor)) == 0, 5, "the workers to stop")
    ids = push_backlog(client, "p", 3)
    wait_for(lambda: all(task_hash(client, "p", t).get("status") == "pending" for t in ids), 5, "pending tasks")
    assert not log_path.exists()
    assert provider_rows(supervisor.config_path)["p"]["paused"] is True

    assert cli(supervisor.config_path, "provider", "resume", "p").returncode == 0
    wait_for(lambda: all(task_hash(client, "p", t).get("status") == "completed" for t in ids), 15, "the tasks to run")


def test_add_and_remove_provider(start_supervisor, redis_server, slow_script, tmp_path):
    script, log_path = slow_script
    supervisor = start_supervisor({"p": command_provider(script)})
    client = redis_server.client()
    driver = orjson.dumps(command_provider(script)["driver"]).decode()
    added = cli(supervisor.config_path, "provider", "add", "extra", f"driver={driver}", "allowConcurrentTasks=true",
                "maxConcurrentTasks=2")
    assert added.returncode == 0, added.stderr
    ids = push_backlog(client, "extra", 2, prefix="x")
    wait_for(lambda: all(task_hash(client, "extra", t).get("status") == "running" for t in ids), 10, "two running tasks")

    assert cli(supervisor.config_path, "provider", "remove", "extra").returncode == 0
    wait_for(lambda: all(task_hash(client, "extra", t).get("status") == "completed" for t in ids), 10, "both to finish")
    wait_for(lambda: "extra" not in provider_rows(supervisor.config_path), 5, "the provider to disappear")
    later = push_backlog(client, "extra", 1, prefix="late")
    assert task_hash(client, "extra", later[0]).get("status") is None
    assert "supervisor stopped" not in supervisor.log()


def test_file_reload_and_precedence(start_supervisor, redis_server, slow_script):
    script, _log_path = slow_script
    supervisor = start_supervisor({"p": command_provider(script, concurrent=2)})
    wait_for(lambda: len(worker_processes(supervisor)) == 2, 5, "two workers")

    assert cli(supervisor.config_path, "provider", "set", "p", "maxConcurrentTasks=1").returncode == 0
    wait_for(lambda: len(worker_processes(supervisor)) == 1, 5, "the Redis setting")
    document = yaml.safe_load(supervisor.config_path.read_text())
    document["providers"]["p"]["maxConcurrentTasks"] = 3
    supervisor.config_path.write_text(yaml.safe_dump(document))
    os.kill(supervisor.process.pid, signal.SIGHUP)
    wait_for(lambda: "SIGHUP received; reloading the configuration" in supervisor.log(), 5, "the reload")
    assert len(worker_processes(supervisor)) == 1
    assert provider_rows(supervisor.config_path)["p"]["maxConcurrentTasks"] == 1

    assert cli(supervisor.config_path, "provider", "unset", "p", "maxConcurrentTasks").returncode == 0
    wait_for(lambda: len(worker_processes(supervisor)) == 3, 5, "the file's value")
    document["providers"]["p"]["maxConcurrentTasks"] = 2
    supervisor.config_path.write_text(yaml.safe_dump(document) + "\n# edited\n")
    wait_for(lambda: len(worker_processes(supervisor)) == 2, 5, "the edited file without a signal")


def test_invalid_settings_rejected(start_supervisor, slow_script):
    script, _log_path = slow_script
    supervisor = start_supervisor({"p": command_provider(script)})
    bad = cli(supervisor.config_path, "provider", "set", "p", "maxConcurrentTasks=-3")
    assert bad.returncode != 0
    assert "not changed" in bad.stderr
    assert "maxConcurrentTasks" in bad.stderr
    unknown = cli(supervisor.config_path, "provider", "set", "p", "maxWorkers=3")
    assert unknown.returncode != 0
    assert "unknown key 'maxWorkers'" in unknown.stderr
    missing = cli(supervisor.config_path, "provider", "set", "nope", "maxConcurrentTasks=2")
    assert missing.returncode != 0
    assert "unknown provider 'nope'" in missing.stderr
