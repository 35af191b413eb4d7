"""`taskvisor stats` through click's CliRunner, on a real database and a private redis-server."""

import time
from pathlib import Path

import orjson
import pytest
import yaml
from click.testing import CliRunner, Result

from shared.keys import Keys
from shared.store import InstanceRecord, TaskRecord, open_store
from supervisor.cli_stats import nearest_rank, stats
from supervisor.status import status_key
from tests.harness import command_provider, write_script

HOUR = 3600.0
DAY = 24 * HOUR


def make_task(task_id: str, provider: str, status: str, *, task_type: str = "start", started: float | None = None,
         completed: float | None = None, created: float) -> TaskRecord:
    return TaskRecord(
        id=task_id, provider_id=provider, instance_id="vm-1", user_id="alice", task_type=task_type, status=status,
        progress=100.0 if status == "completed" else 0.0, status_message="", error_message="", task_data="{}",
        result=None, timeout_seconds=300.0, attempts=1 if started else 0, version=3, created_at=created,
        started_at=started, completed_at=completed, updated_at=completed or created,
    )  # fmt: skip


def sample_tasks(now: float) -> list[TaskRecord]:
    """Tasks on pve-1 and pve-2 whose expected statistics the tests check."""
    tasks = []
    # 20 start tasks completed in the last hour. Task n ran for n seconds.
    for n in range(1, 21):
        completed = now - 600 - n
        tasks.append(make_task(f"start-{n}", "pve-1", "completed", started=completed - n, completed=completed,
                          created=completed - n - 1))  # fmt: skip
    # A create task two days ago: outside both windows.
    tasks.append(make_task("create-old", "pve-1", "completed", task_type="create", started=now - 2 * DAY - 500,
                      completed=now - 2 * DAY, created=now - 2 * DAY - 501))  # fmt: skip
    for name, status, age in (
        ("failed-1", "failed", 300), ("failed-2", "failed", 200), ("failed-old", "failed", 2 * HOUR),
        ("timeout-1", "timeout", 100), ("cancelled-1", "cancelled", 50), ("cancelled-2", "cancelled", 40),
    ):  # fmt: skip
        tasks.append(make_task(name, "pve-1", status, started=now - age - 5, completed=now - age, created=now - age - 6))
    tasks.append(make_task("cancelled-unstarted", "pve-1", "cancelled", completed=now - 30, created=now - 31))
    tasks.append(make_task("running-1", "pve-1", "running", started=now - 20, created=now - 21))
    tasks.extend(make_task(f"pending-{n}", "pve-2", "pending", created=now - n) for n in range(4))
    return tasks


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    script = write_script(tmp_path / "op.sh", "exit 0\n")
    path = tmp_path / "taskvisor.yaml"
    path.write_text(yaml.safe_dump({
        "providers": {
            "pve-1": command_provider(script, concurrent=3),
            "pve-2": command_provider(script),
            "pve-3": command_provider(script),
        },
    }))  # fmt: skip
    return path


@pytest.fixture
def filled_database(store_url: str) -> str:
    with open_store(store_url) as store:
        store.init_schema()
        store.write_batch(sample_tasks(time.time()), [InstanceRecord("vm-1", "pve-1", "running", "start-1", 1, 0.0)])
    return store_url


@pytest.fixture
def filled_redis(redis_server) -> str:
    client = redis_server.client()
    keys = Keys()
    for n in range(5):
        client.xadd(keys.tasks("pve-1"), {"type": "start", "instance": f"vm-{n}", "user": "alice"})
    client.hset(keys.busy("pve-1"), "vm-pve-1-0:100", "start-1 1714564800.0")
    # pve-2 has one worker, yet two are busy (as after maxConcurrentTasks went down): idle stays 0.
    for n in range(3):
        client.xadd(keys.tasks("pve-2"), {"type": "stop", "instance": f"vm-{n}", "user": "bob"})
    client.hset(keys.busy("pve-2"), mapping={"vm-pve-2-0:200": "a 1.0", "vm-pve-2-1:201": "b 1.0"})
    write_supervisor_status(client, {"pve-1": 3, "pve-2": 1, "pve-3": 1})
    return redis_server.url


def write_supervisor_status(client, workers: dict[str, int]) -> None:
    """Write the status record a running supervisor keeps, with these live worker counts."""
    providers = {provider: {"target": count, "workers": count, "retiring": 0} for provider, count in workers.items()}
    client.set(status_key(Keys(), "vm"), orjson.dumps({"name": "vm", "providers": providers}))


def run_stats(config_file: Path, database_url: str, redis_url: str, *extra: str) -> Result:
    arguments = ["--config", str(config_file), "--database-url", database_url, "--redis-url", redis_url, *extra]
    return CliRunner().invoke(stats, arguments, catch_exceptions=False)


def table_rows(output: str, title: str) -> dict[str, list[str]]:
    """Return the rows of the table under `title`, keyed by their first cell."""
    section = next(block for block in output.split("\n\n") if block.startswith(title))
    return {line.split()[0]: line.split()[1:] for line in section.splitlines()[2:]}


def test_stats_text(config_file: Path, filled_database: str, filled_redis: str) -> None:
    result = run_stats(config_file, filled_database, filled_redis)

    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    counts = table_rows(result.stdout, "Tasks by status")
    header = result.stdout.splitlines()[1].split()
    assert header == ["PROVIDER", "PENDING", "RUNNING", "CANCELLING", "COMPLETED", "FAILED", "TIMEOUT", "CANCELLED",
                      "TOTAL"]  # fmt: skip
    assert counts["(all)"] == ["4", "1", "0", "21", "3", "1", "3", "33"]
    assert counts["pve-1"] == ["0", "1", "0", "21", "3", "1", "3", "29"]
    assert counts["pve-2"] == ["4", "0", "0", "0", "0", "0", "0", "4"]
    assert counts["pve-3"] == ["0"] * 8

    run_times = table_rows(result.stdout, "Run time of tasks completed in the last 24 h")
    assert run_times["start"] == ["20", "10.0", "s", "19.0", "s"]
    assert run_times["create"] == ["0", "n/a", "n/a"]
    assert run_times["reset-password"] == ["0", "n/a", "n/a"]

    queues = table_rows(result.stdout, "Queue per provider")
    assert queues["pve-1"] == ["4", "1", "2", "3"]
    assert queues["pve-2"] == ["1", "2", "0", "1"]
    assert queues["pve-3"] == ["0", "0", "1", "1"]

    assert "Errors in the last 1 h: 3 of 26 tasks (11.5 %) ended as failed or timeout" in result.stdout


def test_stats_json(config_file: Path, filled_database: str, filled_redis: str) -> None:
    result = run_stats(config_file, filled_database, filled_redis, "--json")

    assert result.exit_code == 0, result.output
    report = orjson.loads(result.stdout)
    assert report["status_counts"]["(all)"]["cancelled"] == 3
    assert report["status_counts"]["(all)"]["failed"] == 3
    assert report["status_counts"]["pve-2"] == {
        "pending": 4, "running": 0, "cancelling": 0, "completed": 0, "failed": 0, "timeout": 0, "cancelled": 0,
        "total": 4,
    }  # fmt: skip

    start = report["run_times"]["task_types"]["start"]
    assert start["tasks"] == 20
    assert start["p50_seconds"] == pytest.approx(10.0, abs=1e-5)
    assert start["p95_seconds"] == pytest.approx(19.0, abs=1e-5)
    assert report["run_times"]["task_types"]["create"] == {"tasks": 0, "p50_seconds": None, "p95_seconds": None}
    assert report["run_times"]["sample_limit_reached"] is False

    assert report["queues"] == {
        "pve-1": {"queued": 4, "busy": 1, "idle": 2, "workers": 3},
        "pve-2": {"queued": 1, "busy": 2, "idle": 0, "workers": 1},
        "pve-3": {"queued": 0, "busy": 0, "idle": 1, "workers": 1},
    }
    assert report["error_rate"]["errors"] == 3
    assert report["error_rate"]["terminal"] == 26
    assert report["error_rate"]["percent"] == pytest.approx(100 * 3 / 26)
    assert report["error_rate"]["rejected"] == 0


def test_stats_without_redis(config_file: Path, filled_database: str, redis_server) -> None:
    redis_server.stop()

    result = run_stats(config_file, filled_database, redis_server.url)
    as_json = run_stats(config_file, filled_database, redis_server.url, "--json")

    assert result.exit_code == 0, result.output
    assert f"warning: Redis at {redis_server.url} failed" in result.stderr
    assert "queue lengths and worker counts are missing" in result.stderr
    assert table_rows(result.stdout, "Tasks by status")["(all)"][-1] == "33"
    assert "Queue per provider" not in result.stdout
    assert "3 of 26 tasks (11.5 %)" in result.stdout

    assert as_json.exit_code == 0, as_json.output
    assert "warning: Redis" in as_json.stderr
    report = orjson.loads(as_json.stdout)
    assert report["queues"] is None
    assert report["error_rate"]["terminal"] == 26


def test_stats_empty_database(config_file: Path, sqlite_url: str, redis_server) -> None:
    with open_store(sqlite_url) as store:
        store.init_schema()

    write_supervisor_status(redis_server.client(), {"pve-1": 3})
    result = run_stats(config_file, sqlite_url, redis_server.url)

    assert result.exit_code == 0, result.output
    assert table_rows(result.stdout, "Tasks by status")["(all)"] == ["0"] * 8
    assert table_rows(result.stdout, "Run time")["start"] == ["0", "n/a", "n/a"]
    assert table_rows(result.stdout, "Queue per provider")["pve-1"] == ["0", "0", "3", "3"]
    assert "0 of 0 tasks (n/a)" in result.stdout


def test_stats_without_tables(config_file: Path, sqlite_url: str, redis_server) -> None:
    result = run_stats(config_file, sqlite_url, redis_server.url)

    assert result.exit_code == 1
    assert "taskvisor db init" in result.stderr


@pytest.mark.parametrize(
    ("values", "percent", "expected"),
    [
        (list(range(1, 21)), 50, 10),
        (list(range(1, 21)), 95, 19),
        ([1, 2, 3, 4], 50, 2),
        ([1, 2, 3, 4], 95, 4),
        ([7.5], 50, 7.5),
        ([7.5], 95, 7.5),
        ([], 50, None),
    ],
)
def test_nearest_rank(values: list[float], percent: int, expected: float | None) -> None:
    assert nearest_rank(values, percent) == expected
