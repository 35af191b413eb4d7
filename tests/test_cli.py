"""The taskvisor command as an operator runs it."""

import os
import subprocess
import sys

import orjson
import pytest
import yaml

from tests.harness import REPO, command_provider, wait_for, write_script


def taskvisor(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, PYTHONPATH=str(REPO), **(env or {}))
    for name in ("TASKVISOR_CONFIG", "TASKVISOR_REDIS_URL", "TASKVISOR_DATABASE_URL"):
        if not env or name not in env:
            full_env.pop(name, None)
    return subprocess.run([sys.executable, "-m", "supervisor", *args], capture_output=True, text=True, env=full_env, timeout=60)


@pytest.fixture
def config_file(tmp_path, redis_server, sqlite_url):
    script = write_script(tmp_path / "op.sh", 'cat >/dev/null\necho "progress 40 half"\necho \'{"ip": "10.0.0.5"}\'\n')
    path = tmp_path / "taskvisor.yaml"
    path.write_text(yaml.safe_dump({
        "redis": {"url": redis_server.url},
        "database": {"url": sqlite_url},
        "supervisor": {"name": "cli-test", "shutdownGrace": 5},
        "providers": {"pve-1": command_provider(script)},
    }))  # fmt: skip
    return path


def test_submit_get_list(config_file):
    env = {"TASKVISOR_CONFIG": str(config_file)}
    assert taskvisor("db", "init", env=env).returncode == 0
    submitted = taskvisor("submit", "--provider", "pve-1", "--type", "start", "--instance", "vm-7", "--user", "alice",
                          "--data", '{"password": "hunter2-long"}', env=env)
    assert submitted.returncode == 0, submitted.stderr
    task_id = submitted.stdout.strip()
    assert task_id.startswith("pve-1:")
    named = taskvisor("submit", "--provider", "pve-1", "--type", "stop", "--instance", "vm-8", "--user", "bob",
                      "--id", "order-77", env=env)
    assert named.stdout.strip() == "order-77"

    process = subprocess.Popen([sys.executable, "-m", "supervisor", "supervise", "--config", str(config_file)],
                               env=dict(os.environ, PYTHONPATH=str(REPO)), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def listed() -> list[dict]:
            result = taskvisor("list", "--json", env=env)
            return [orjson.loads(line) for line in result.stdout.splitlines()]

        wait_for(lambda: {row["status"] for row in listed()} == {"completed"} and len(listed()) == 2, 20,
                 "both tasks completed in SQL")
        shown = taskvisor("get", task_id, "--json", env=env)
        assert shown.returncode == 0
        task = orjson.loads(shown.stdout)
        assert task["status"] == "completed"
        assert task["result"] == '{"ip":"10.0.0.5"}'
        assert task["data"] == '{"password":"***"}'

        table = taskvisor("list", "--user", "bob", env=env)
        assert "order-77" in table.stdout
        assert task_id not in table.stdout

        again = taskvisor("submit", "--provider", "pve-1", "--type", "stop", "--instance", "vm-8", "--user", "bob",
                          "--id", "order-77", env=env)
        assert again.returncode != 0
        assert "task id 'order-77' is already used" in again.stderr
    finally:
        process.terminate()
        process.wait(30)


def test_list_pages_with_cursor(config_file):
    from shared.store import open_store
    from shared.store.records import TaskRecord

    config = yaml.safe_load(config_file.read_text())
    store = open_store(config["database"]["url"])
    store.init_schema()
    store.write_batch([
        TaskRecord(id=f"t-{index:02d}", provider_id="pve-1", instance_id="vm-1", user_id="u", task_type="start",
                   status="completed", progress=100, status_message="", error_message="", task_data="{}", result=None,
                   timeout_seconds=300, attempts=1, version=3, created_at=1_800_000_000 + index, started_at=None,
                   completed_at=None, updated_at=1_800_000_000 + index)
        for index in range(7)
    ], [])  # fmt: skip
    store.close()
    env = {"TASKVISOR_CONFIG": str(config_file)}

    first = taskvisor("list", "--limit", "5", "--json", env=env)
    first_ids = [orjson.loads(line)["id"] for line in first.stdout.splitlines()]
    assert first_ids == ["t-06", "t-05", "t-04", "t-03", "t-02"]
    hint = first.stderr.strip().splitlines()[-1]
    cursor = hint.split("--before ", 1)[1].split(" ", 1)[0]
    second = taskvisor("list", "--limit", "5", "--json", "--before", cursor, env=env)
    assert [orjson.loads(line)["id"] for line in second.stdout.splitlines()] == ["t-01", "t-00"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--type", "start", "--user", "u"], "field 'instance' is missing"),
        (["--type", "start", "--instance", "vm 1", "--user", "u"], "field 'instance' has invalid value 'vm 1'"),
        (["--type", "start", "--instance", "vm-1", "--user", "u", "--data", "[1]"], "field 'data' must be a JSON object"),
        (["--type", "start", "--instance", "vm-1", "--user", "u", "--timeout", "0"], "expected a positive number"),
    ],
)
def test_submit_rejects_bad_input(config_file, redis_server, args, message):
    result = taskvisor("submit", "--provider", "pve-1", *args, env={"TASKVISOR_CONFIG": str(config_file)})
    assert result.returncode != 0
    assert message in result.stderr
    assert redis_server.client().xlen("taskvisor:{pve-1}:tasks") == 0


def test_submit_unknown_provider(config_file):
    result = taskvisor("submit", "--provider", "pve-9", "--type", "start", "--instance", "vm-1", "--user", "u",
                       env={"TASKVISOR_CONFIG": str(config_file)})
    assert result.returncode != 0
    assert "unknown provider 'pve-9': known providers are pve-1" in result.stderr


def test_get_unknown_task(config_file):
    env = {"TASKVISOR_CONFIG": str(config_file)}
    assert taskvisor("db", "init", env=env).returncode == 0
    result = taskvisor("get", "no-such-task", env=env)
    assert result.returncode != 0
    assert "task 'no-such-task' not found in Redis or in the database" in result.stderr


def test_list_missing_database_file(config_file, sqlite_url):
    path = sqlite_url.removeprefix("sqlite:///")
    for command in (["list"], ["get", "no-such-task"], ["stats"]):
        result = taskvisor(*command, env={"TASKVISOR_CONFIG": str(config_file)})
        assert result.returncode == 1
        assert f"SQLite database {path} (from {sqlite_url}) does not exist: check database.url" in result.stderr
    assert not os.path.exists(path)


def test_list_before_db_init(config_file, sqlite_url):
    # An empty file, as a database that another tool created, has no taskvisor tables.
    open(sqlite_url.removeprefix("sqlite:///"), "wb").close()
    result = taskvisor("list", env={"TASKVISOR_CONFIG": str(config_file)})
    assert result.returncode == 1
    assert "the taskvisor tables do not exist yet: run `taskvisor db init`" in result.stderr


def test_supervise_rejects_invalid_config(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("providers:\n  pve-1:\n    maxConcurentTasks: 3\n    driver: {type: command, commands: {start: [x]}}\n")
    result = taskvisor("supervise", "--config", str(path))
    assert result.returncode != 0
    assert "unknown key 'maxConcurentTasks' under providers.pve-1; did you mean 'maxConcurrentTasks'?" in result.stderr


def test_supervise_reports_unreachable_redis(tmp_path, config_file):
    from tests.fixtures_redis import free_port

    result = taskvisor("supervise", "--config", str(config_file), "--redis-url", f"redis://127.0.0.1:{free_port()}/0")
    assert result.returncode != 0
    assert "cannot reach Redis at redis://127.0.0.1:" in result.stderr


def test_db_init_twice(config_file, mariadb_url):
    env = {"TASKVISOR_CONFIG": str(config_file), "TASKVISOR_DATABASE_URL": mariadb_url}
    assert taskvisor("db", "init", env=env).returncode == 0
    again = taskvisor("db", "init", env=env)
    assert again.returncode == 0
    assert "schema ready" in again.stdout


def test_submit_type_without_command(config_file, tmp_path):
    document = yaml.safe_load(config_file.read_text())
    document["providers"]["pve-1"]["driver"]["commands"] = {"start": ["/bin/true"]}
    config_file.write_text(yaml.safe_dump(document))
    result = taskvisor("submit", "--provider", "pve-1", "--type", "delete", "--instance", "vm-1", "--user", "u",
                       env={"TASKVISOR_CONFIG": str(config_file)})
    assert result.returncode != 0
    assert "provider 'pve-1' has no command for task type 'delete'" in result.stderr


def test_get_shows_history(config_file):
    env = {"TASKVISOR_CONFIG": str(config_file)}
    task_id = taskvisor("submit", "--provider", "pve-1", "--type", "start", "--instance", "vm-1", "--user", "u",
                        env=env).stdout.strip()
    process = subprocess.Popen([sys.executable, "-m", "supervisor", "supervise", "--config", str(config_file)],
                               env=dict(os.environ, PYTHONPATH=str(REPO)), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: orjson.loads(taskvisor("get", task_id, "--json", env=env).stdout or "{}").get("status") == "completed",
                 20, "the task to complete")
    finally:
        process.terminate()
        process.wait(30)
    shown = orjson.loads(taskvisor("get", task_id, "--json", env=env).stdout)
    statuses = [item["status"] for item in shown["history"]]
    assert statuses[0] == "pending"
    assert statuses[-1] == "completed"
    assert "running" in statuses
    assert any(item["message"] == "half" for item in shown["history"])
    assert "remaining_seconds" not in shown
    text = taskvisor("get", task_id, env=env).stdout
    assert "history" in text


def test_list_created_range(config_file):
    from shared.store import open_store
    from shared.store.records import TaskRecord

    store = open_store(yaml.safe_load(config_file.read_text())["database"]["url"])
    store.init_schema()
    store.write_batch([
        TaskRecord(id=f"r-{index}", provider_id="pve-1", instance_id="vm-1", user_id="u", task_type="stop",
                   status="failed", progress=0, status_message="", error_message="line one\nline two",
                   task_data="{}", result=None, timeout_seconds=300, attempts=1, version=3,
                   created_at=1_800_000_000 + index, started_at=None, completed_at=None, updated_at=1_800_000_000 + index)
        for index in range(7)
    ], [])  # fmt: skip
    store.close()
    env = {"TASKVISOR_CONFIG": str(config_file)}
    ranged = taskvisor("list", "--json", "--created-from", "2027-01-15T08:00:03", "--created-until", "2027-01-15T08:00:05",
                       env=env)
    assert ranged.returncode == 0, ranged.stderr
    assert [orjson.loads(line)["id"] for line in ranged.stdout.splitlines()] == ["r-4", "r-3"]
    table = taskvisor("list", "--status", "failed", env=env).stdout.splitlines()
    assert len(table) == 8
    assert all("line one line two" in row for row in table[1:])
    bogus = taskvisor("list", "--status", "broken", env=env)
    assert bogus.returncode != 0
    assert "'broken' is not one of" in bogus.stderr


def test_global_option_after_command(tmp_path):
    result = taskvisor("supervise", "--log-format", "json", "--config", str(tmp_path / "taskvisor.yaml"))
    assert result.returncode == 2
    assert (
        "--log-format is an option of taskvisor itself and goes before the command:"
        " python -m supervisor --log-format json supervise ..."
    ) in result.stderr
    nested = taskvisor("db", "init", "--log-level", "DEBUG")
    assert nested.returncode == 2
    assert "goes before the command: python -m supervisor --log-level DEBUG db init ..." in nested.stderr
    # Any other unknown option keeps click's own message.
    other = taskvisor("list", "--bogus")
    assert other.returncode == 2
    assert "No such option '--bogus'" in other.stderr
