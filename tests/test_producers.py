"""The producer examples in examples/producers/ against a live supervisor on a private Redis.

Each example runs as a user would run it, with TASKVISOR_REDIS_URL or --redis-url
pointing at the test's redis-server. node, npm's node_modules, php with the redis
extension, redis-cli and jq are installed by `bin/setup --test`, so a missing one
fails the test instead of skipping it.
"""

import json
import os
import shutil
import subprocess

import orjson
import pytest

from tests.harness import REPO, command_provider, task_hash, wait_for, write_script

EXAMPLES = REPO / "examples" / "producers"
NODE_DIR = EXAMPLES / "node"
RUN_TIMEOUT_SECONDS = 30

# Instances named slow-* run for 30 s; the others report progress and complete.
OPERATION = """\
cat >/dev/null
case "$2" in
  slow-*) echo "progress 10 started $2"; sleep 30 ;;
esac
echo "progress 50 working on $2"
sleep 0.3
echo "{\\"done\\": \\"$1\\"}"
"""


def require_tool(name: str, package: str) -> str:
    found = shutil.which(name)
    assert found, f"{name} is missing: install the {package} package (bin/setup --test does)"
    return found


def producer_argv(language: str) -> list[str]:
    if language == "node":
        require_tool("node", "nodejs")
        assert (NODE_DIR / "node_modules" / "redis").is_dir(), (
            f"node-redis is not installed in {NODE_DIR}: run `npm ci` there (bin/setup --test does)"
        )
        return ["node", str(NODE_DIR / "producer.mjs")]
    if language == "shell":
        require_tool("redis-cli", "redis-tools")
        require_tool("jq", "jq")
        return ["bash", str(EXAMPLES / "shell" / "producer.sh")]
    php = require_tool("php", "php-cli")
    loaded = subprocess.run([php, "-r", "exit(extension_loaded('redis') ? 0 : 1);"], check=False)
    assert loaded.returncode == 0, "the PHP redis extension is missing: install the php-redis package"
    return ["php", str(EXAMPLES / "php" / "producer.php")]


class Producer:
    """One example producer, run as a command with the Redis URL in its environment."""

    def __init__(self, language: str, redis_url: str) -> None:
        self.argv = producer_argv(language)
        self.env = {**os.environ, "TASKVISOR_REDIS_URL": redis_url}
        self.env.pop("TASKVISOR_PREFIX", None)

    def run(self, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*self.argv, *args], check=False, capture_output=True, text=True, timeout=RUN_TIMEOUT_SECONDS,
            env=env or self.env, cwd=EXAMPLES,
        )  # fmt: skip


@pytest.fixture(params=["node", "shell", "php"])
def producer(request, redis_server) -> Producer:
    return Producer(request.param, redis_server.url)


@pytest.fixture
def supervisor(tmp_path, start_supervisor):
    script = write_script(tmp_path / "operation.sh", OPERATION)
    return start_supervisor({"p": command_provider(script, concurrent=2)})


def status_of(client, task_id: str) -> str | None:
    return task_hash(client, "p", task_id).get("status")


def test_producer_submits_and_follows(producer, redis_server, supervisor):
    submitted = producer.run(
        "submit", "p", "reset-password", "--user", "17", "--instance", "vm-1", "--id", "task-1",
        "--timeout", "120", "--data", '{"username": "root", "password": "n3w-Secret"}',
    )  # fmt: skip
    assert submitted.returncode == 0, submitted.stderr
    assert submitted.stdout.strip() == "task-1"
    derived = producer.run("submit", "p", "create", "--user", "17")
    assert derived.returncode == 0, derived.stderr

    followed = producer.run("follow", "p", "task-1", "--wait", "20")

    assert followed.returncode == 0, followed.stderr
    lines = followed.stdout.strip().splitlines()
    assert lines[-1] == "completed 100"
    statuses = [line.split(" ", 1)[0] for line in lines]
    assert set(statuses) <= {"pending", "running", "completed"}
    assert statuses == sorted(statuses, key=["pending", "running", "completed"].index)
    task = task_hash(redis_server.client(), "p", "task-1")
    assert task["type"] == "reset-password"
    assert task["user"] == "17"
    assert task["timeout"] == "120.0"
    assert json.loads(task["data"]) == {"username": "root", "password": "***"}
    # Without --id, the printed id is derived from the stream entry id.
    derived_id = derived.stdout.strip()
    assert derived_id.startswith("p:")
    wait_for(lambda: status_of(redis_server.client(), derived_id) == "completed", 15, f"task {derived_id} to complete")


def test_producer_cancels_task(producer, redis_server, supervisor):
    client = redis_server.client()
    submitted = producer.run("submit", "p", "start", "--user", "alice", "--instance", "slow-1", "--id", "slow-task")
    assert submitted.returncode == 0, submitted.stderr
    wait_for(lambda: status_of(client, "slow-task") == "running", 10, "the slow task to run")

    rejected = producer.run("cancel", "p", "slow-task", "--user", "mallory")
    accepted = producer.run("cancel", "p", "slow-task", "--user", "alice", "--reason", "changed plan")
    followed = producer.run("follow", "p", "slow-task", "--wait", "10")

    assert rejected.returncode == 1
    assert "cancel rejected: user mallory may not cancel a task of user alice" in rejected.stderr
    assert accepted.returncode == 0, accepted.stderr
    assert accepted.stdout.strip() in ("slow-task cancelling", "slow-task cancelled")
    assert followed.returncode == 0, followed.stderr
    assert followed.stdout.strip().splitlines()[-1].startswith("cancelled ")
    task = task_hash(client, "p", "slow-task")
    assert task["cancelled_by"] == "alice"
    assert task["cancel_reason"] == "changed plan"
    assert "cancel_error" not in task


def test_producer_changes_concurrency(producer, redis_server, supervisor):
    client = redis_server.client()

    def target() -> int | None:
        raw = client.get("taskvisor:supervisor:test")
        return orjson.loads(raw)["providers"]["p"]["target"] if raw else None

    wait_for(lambda: target() == 2, 10, "the supervisor to report 2 workers")
    # --redis-url wins over TASKVISOR_REDIS_URL, which points at another database of
    # the same private server here.
    other_database = {**producer.env, "TASKVISOR_REDIS_URL": producer.env["TASKVISOR_REDIS_URL"][:-1] + "1"}

    raised = producer.run("concurrency", "p", "3", "--redis-url", redis_server.url, env=other_database)
    assert raised.returncode == 0, raised.stderr
    wait_for(lambda: target() == 3, 10, "the supervisor to report 3 workers")
    assert raised.stdout.strip() == "p: maxConcurrentTasks=3"
    assert client.hgetall("taskvisor:{p}:settings") == {b"allowConcurrentTasks": b"true", b"maxConcurrentTasks": b"3"}

    # One task at a time is written as allowConcurrentTasks false.
    lowered = producer.run("concurrency", "p", "1")
    assert lowered.returncode == 0, lowered.stderr
    assert client.hgetall("taskvisor:{p}:settings") == {b"allowConcurrentTasks": b"false", b"maxConcurrentTasks": b"1"}


INVALID_SUBMISSIONS = [
    (["start", "--user", "17"], "field 'instance' is missing"),
    (["reboot", "--user", "17", "--instance", "vm-1"], "field 'type' has invalid value 'reboot'"),
    (["start", "--user", "17", "--instance", "vm-1", "--timeout", "604801"], "field 'timeout' has invalid value '604801'"),
    (["start", "--user", "17", "--instance", "vm-1", "--data", "[1, 2]"], "field 'data' must be a JSON object"),
]


@pytest.mark.parametrize(("arguments", "message"), INVALID_SUBMISSIONS, ids=["instance", "type", "timeout", "data"])
def test_producer_rejects_invalid_task(producer, redis_server, arguments, message):
    result = producer.run("submit", "p", *arguments)

    assert result.returncode == 1
    assert f"error: {message}" in result.stderr
    assert redis_server.client().xlen("taskvisor:{p}:tasks") == 0


def test_node_consumer_sees_every_change(redis_server, supervisor):
    producer = Producer("node", redis_server.url)
    client = redis_server.client()
    consumer = subprocess.Popen(
        ["node", str(NODE_DIR / "events.mjs"), "p", "quick-1", "slow-2", "--wait", "25"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=producer.env, cwd=NODE_DIR,
    )  # fmt: skip
    try:
        assert consumer.stderr.readline().startswith("listening after ")
        for task_id, instance in (("quick-1", "vm-1"), ("slow-2", "slow-2")):
            submitted = producer.run("submit", "p", "start", "--user", "u", "--instance", instance, "--id", task_id)
            assert submitted.returncode == 0, submitted.stderr
        wait_for(lambda: status_of(client, "slow-2") == "running", 10, "the slow task to run")
        assert producer.run("cancel", "p", "slow-2").returncode == 0
        output, errors = consumer.communicate(timeout=RUN_TIMEOUT_SECONDS)
    finally:
        if consumer.poll() is None:
            consumer.kill()
            consumer.wait()
    assert consumer.returncode == 0, errors

    events = [json.loads(line) for line in output.splitlines()]
    for task_id, expected in (
        ("quick-1", ["pending", "running", "completed"]),
        ("slow-2", ["pending", "running", "cancelling", "cancelled"]),
    ):
        seen = [event for event in events if event["id"] == task_id]
        statuses = [event["status"] for event in seen]
        assert [status for index, status in enumerate(statuses) if index == 0 or statuses[index - 1] != status] == expected
        assert [event["version"] for event in seen] == list(range(1, len(seen) + 1))
        history = [orjson.loads(item) for item in client.lrange(f"taskvisor:{{p}}:history:{task_id}", 0, -1)]
        assert statuses == [item["status"] for item in history]
        assert [event["progress"] for event in seen] == [float(item["progress"]) for item in history]
    quick = [event for event in events if event["id"] == "quick-1"]
    assert {"status": "running", "progress": 50, "message": "working on vm-1"}.items() <= quick[2].items()
