"""The health endpoint of a real supervisor: readiness, liveness, status, metrics and the CLI."""

import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from urllib.parse import urlsplit

import orjson
import pytest
import yaml

from shared import heartbeat
from shared.errors import ConfigError
from shared.heartbeat import EXITED, LIVE, HeartbeatTable
from shared.settings import load_config, parse_config
from shared.store import open_store
from supervisor.monitor import Monitor
from supervisor.prometheus import MetricsWriter, escape_label_value
from tests.harness import REPO, command_provider, wait_for, write_script

# A short timeout keeps the tests quick; 2 s is the smallest value the config accepts.
HEALTH = {"heartbeatTimeout": 2}
# The no-proxy opener keeps every request on the loopback URL the supervisor logged.
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def get(url: str, path: str) -> tuple[int, bytes]:
    try:
        with OPENER.open(url + path, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read()


def get_json(url: str, path: str) -> tuple[int, dict]:
    code, body = get(url, path)
    return code, orjson.loads(body)


def readiness(url: str) -> tuple[int, list[str]]:
    code, body = get_json(url, "/readyz")
    assert body["ready"] is (code == 200), body
    return code, body["reasons"]


def worker_pid(url: str, provider: str, slot: int) -> int:
    _code, status = get_json(url, "/status")
    for process in status["processes"]:
        if process["role"] == "worker" and process["provider"] == provider and process["slot"] == slot:
            return process["pid"]
    raise AssertionError(f"no worker {provider}/{slot} in /status: {status['processes']}")


def reason_about(url: str, text: str) -> list[str] | None:
    """Return the /readyz reasons when /readyz is 503 and one reason contains `text`."""
    code, reasons = readiness(url)
    if code == 503 and any(text in reason for reason in reasons):
        return reasons
    return None


def healthz_body(url: str, expected_code: int) -> dict | None:
    """Return the /healthz body when the status is `expected_code`, else None."""
    code, body = get_json(url, "/healthz")
    return body if code == expected_code else None


def assert_healthy(url: str) -> None:
    code, body = get_json(url, "/healthz")
    assert code == 200, body
    assert body["healthy"] is True


@pytest.fixture
def script(tmp_path):
    """A command that sleeps $SLEEP seconds (default 0.2) and fails for `delete` tasks."""
    return write_script(
        tmp_path / "op.sh",
        'cat >/dev/null\nsleep "${SLEEP:-0.2}"\n'
        'if [ "$1" = delete ]; then echo "instance is locked" >&2; exit 1; fi\necho "{}"\n',
    )


@pytest.fixture
def ready_supervisor(start_supervisor, script):
    """Start a supervisor with two workers for provider `p` and return its health URL once ready."""

    def start(providers: dict | None = None) -> tuple[object, str]:
        supervisor = start_supervisor(providers or {"p": command_provider(script, concurrent=2)}, health=HEALTH)
        url = supervisor.health_url()
        wait_for(lambda: readiness(url)[0] == 200, 15, "/readyz to answer 200 after the start")
        return supervisor, url

    return start


# -- readiness ------------------------------------------------------------------------


def test_readyz_reports_killed_worker(ready_supervisor):
    _supervisor, url = ready_supervisor()
    victim = worker_pid(url, "p", 0)

    os.kill(victim, signal.SIGKILL)
    reasons = wait_for(lambda: reason_about(url, f"pid {victim} killed by SIGKILL"), 5, "/readyz to report the kill")
    assert any("worker p/0" in reason for reason in reasons), reasons
    assert_healthy(url)

    wait_for(lambda: readiness(url)[0] == 200, 10, "/readyz to recover after the replacement")
    replacement = worker_pid(url, "p", 0)
    assert replacement != victim
    _code, status = get_json(url, "/status")
    exits = [entry for entry in status["recent_exits"] if entry["pid"] == victim]
    assert exits, status["recent_exits"]
    assert exits[0]["exit"] == "killed by SIGKILL"
    assert exits[0]["requested"] is False


def test_readyz_reports_stopped_worker(ready_supervisor):
    _supervisor, url = ready_supervisor()
    victim = worker_pid(url, "p", 1)

    os.kill(victim, signal.SIGSTOP)
    try:
        reasons = wait_for(lambda: reason_about(url, f"pid {victim} is stopped"), 5, "/readyz to report the SIGSTOP")
        assert any("provider p has 1 of 2 workers working" in reason for reason in reasons), reasons
        assert_healthy(url)
    finally:
        os.kill(victim, signal.SIGCONT)
    wait_for(lambda: readiness(url)[0] == 200, 5, "/readyz to recover after SIGCONT")
    assert worker_pid(url, "p", 1) == victim


def test_readyz_follows_redis_outage(ready_supervisor, redis_server):
    _supervisor, url = ready_supervisor()

    redis_server.stop()
    reasons = wait_for(lambda: reason_about(url, "did not answer PING"), 5, "/readyz to report the Redis outage")
    assert any(f"127.0.0.1:{redis_server.port}" in reason for reason in reasons), reasons
    # The supervisor's loop keeps running without Redis: liveness stays 200 for
    # longer than the heartbeat timeout.
    outage_end = time.monotonic() + HEALTH["heartbeatTimeout"] + 1
    while time.monotonic() < outage_end:
        assert_healthy(url)
        time.sleep(0.2)
    assert readiness(url)[0] == 503

    redis_server.start()
    wait_for(lambda: readiness(url)[0] == 200, 15, "/readyz to recover after Redis restarts")
    assert_healthy(url)


def test_healthz_reports_stopped_supervisor(ready_supervisor):
    supervisor, url = ready_supervisor()

    supervisor.process.send_signal(signal.SIGSTOP)
    try:
        body = wait_for(lambda: healthz_body(url, 503), 5, "/healthz to report the stopped supervisor")
        assert body["healthy"] is False
        assert f"the supervisor pid {supervisor.process.pid} is stopped" in body["reasons"][0]
        assert readiness(url)[0] == 503
    finally:
        supervisor.process.send_signal(signal.SIGCONT)
    wait_for(lambda: healthz_body(url, 200), 5, "/healthz to recover after SIGCONT")


def test_healthz_and_readyz_during_shutdown(ready_supervisor, tmp_path):
    slow = write_script(tmp_path / "slow.sh", 'cat >/dev/null\nsleep 3\necho "{}"\n')
    supervisor, url = ready_supervisor({"p": command_provider(slow)})
    client = supervisor_client(supervisor)
    client.xadd("taskvisor:{p}:tasks", {"id": "long", "type": "start", "instance": "vm-1", "user": "u"})
    wait_for(lambda: status_task_ids(url) == {"long"}, 10, "the task to run")

    supervisor.process.send_signal(signal.SIGTERM)
    wait_for(lambda: reason_about(url, "the supervisor is shutting down"), 5, "/readyz to report the shutdown")
    assert_healthy(url)
    assert supervisor.process.wait(30) == 0


# -- status and metrics ----------------------------------------------------------------


def supervisor_client(supervisor):
    import redis

    return redis.Redis.from_url(supervisor.redis_url)


def status_task_ids(url: str) -> set[str]:
    _code, status = get_json(url, "/status")
    return {process["task_id"] for process in status["processes"] if process["task_id"]}


def test_status_lists_processes(ready_supervisor, tmp_path):
    slow = write_script(tmp_path / "slow.sh", 'cat >/dev/null\nsleep 5\necho "{}"\n')
    supervisor, url = ready_supervisor({"p": command_provider(slow)})
    client = supervisor_client(supervisor)
    pushed_at = time.time()
    client.xadd("taskvisor:{p}:tasks", {"id": "t-1", "type": "start", "instance": "vm-1", "user": "u"})
    wait_for(lambda: status_task_ids(url) == {"t-1"}, 10, "/status to show the running task")

    code, status = get_json(url, "/status")
    assert code == 200
    processes = status["processes"]
    assert sorted(process["role"] for process in processes) == ["intake", "mirror", "monitor", "supervisor", "worker"]
    assert processes[0]["role"] == "supervisor"
    assert processes[0]["pid"] == supervisor.process.pid
    worker = next(process for process in processes if process["role"] == "worker")
    assert (worker["provider"], worker["slot"], worker["task_id"]) == ("p", 0, "t-1")
    assert pushed_at - 1 <= worker["task_started_at"] <= time.time()
    for process in processes:
        assert process["rss_bytes"] > 0, process
        assert process["heartbeat_age_seconds"] is not None, process
        assert process["heartbeat_age_seconds"] < HEALTH["heartbeatTimeout"], process
    # CPU percent needs two samples, so the second request has it.
    _code, again = get_json(url, "/status")
    assert all(process["cpu_percent"] is not None for process in again["processes"]), again["processes"]


METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
SAMPLE_LINE = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)")
LABEL_PAIR = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"')
METRIC_TYPES = {"counter", "gauge", "histogram", "summary", "untyped"}


def unescape(value: str) -> str:
    return re.sub(r"\\([\\\"n])", lambda match: "\n" if match.group(1) == "n" else match.group(1), value)


def parse_sample_value(text: str) -> float:
    special = {"+Inf": math.inf, "-Inf": -math.inf, "NaN": math.nan}
    if text in special:
        return special[text]
    assert re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?", text), f"invalid sample value {text!r}"
    return float(text)


def parse_labels(text: str) -> dict[str, str]:
    labels: dict[str, str] = {}
    position = 0
    while position < len(text):
        match = LABEL_PAIR.match(text, position)
        assert match, f"invalid label syntax at {text[position:]!r}"
        name, raw = match.groups()
        assert name not in labels, f"label {name} repeated in {text!r}"
        labels[name] = unescape(raw)
        position = match.end()
        if position < len(text):
            assert text[position] == ",", f"expected ',' at {text[position:]!r}"
            position += 1
    return labels


def parse_prometheus(text: str) -> dict[str, dict]:
    """Parse the text format 0.0.4 strictly: every sample needs an earlier HELP and TYPE line.

    Returns name -> {"help", "type", "samples": {sorted label pairs: value}}. The label
    pairs of a histogram's samples start with ("__name__", the sample's name).
    """
    assert text.endswith("\n"), "the text must end with a newline"
    families: dict[str, dict] = {}
    for number, line in enumerate(text[:-1].split("\n"), 1):
        if line.startswith("# HELP "):
            name, _, help_text = line[len("# HELP ") :].partition(" ")
            assert METRIC_NAME.fullmatch(name), f"line {number}: invalid metric name {name!r}"
            assert "help" not in families.get(name, {}), f"line {number}: second HELP for {name}"
            assert help_text, f"line {number}: empty HELP for {name}"
            families.setdefault(name, {"samples": {}})["help"] = help_text
        elif line.startswith("# TYPE "):
            name, _, kind = line[len("# TYPE ") :].partition(" ")
            assert kind in METRIC_TYPES, f"line {number}: invalid type {kind!r}"
            family = families.setdefault(name, {"samples": {}})
            assert "type" not in family, f"line {number}: second TYPE for {name}"
            assert not family["samples"], f"line {number}: TYPE for {name} after its samples"
            family["type"] = kind
        else:
            assert not line.startswith("#"), f"line {number}: unexpected comment {line!r}"
            match = SAMPLE_LINE.fullmatch(line)
            assert match, f"line {number}: not a sample line: {line!r}"
            name, label_text, value_text = match.groups()
            family = families.get(name)
            labels = tuple(sorted(parse_labels(label_text or "").items()))
            base = re.sub(r"_(bucket|sum|count)$", "", name)
            if family is None and families.get(base, {}).get("type") == "histogram":
                # The series of a histogram family x are x_bucket, x_sum and x_count.
                family = families[base]
                labels = (("__name__", name), *labels)
            assert family is not None, f"line {number}: {name} has no HELP or TYPE line"
            assert "help" in family, f"line {number}: {name} has no HELP line before its samples"
            assert "type" in family, f"line {number}: {name} has no TYPE line before its samples"
            assert labels not in family["samples"], f"line {number}: repeated series {name}{labels}"
            family["samples"][labels] = parse_sample_value(value_text)
    return families


def test_metrics_parse_and_match_sql(ready_supervisor, redis_server, sqlite_url):
    supervisor, url = ready_supervisor()
    client = redis_server.client()
    batch = [("start", "vm-1"), ("start", "vm-2"), ("stop", "vm-3"), ("restart", "vm-4"), ("delete", "vm-5")]
    for index, (task_type, instance) in enumerate(batch):
        client.xadd("taskvisor:{p}:tasks", {"id": f"m-{index}", "type": task_type, "instance": instance, "user": "u"})

    def sql_counts() -> Counter | None:
        store = open_store(sqlite_url)
        try:
            rows = store.list_tasks(provider="p", limit=500)
        finally:
            store.close()
        if len(rows) != len(batch) or any(row["status"] not in ("completed", "failed") for row in rows):
            return None
        return Counter((row["provider_id"], row["task_type"], row["status"]) for row in rows)

    expected = wait_for(sql_counts, 20, "the batch to end in SQL")
    code, body = get(url, "/metrics")
    assert code == 200
    families = parse_prometheus(body.decode("utf-8"))

    tasks = families["taskvisor_tasks"]
    assert tasks["type"] == "gauge"
    counted = Counter({(dict(labels)["provider"], dict(labels)["type"], dict(labels)["status"]): int(value)
                       for labels, value in tasks["samples"].items()})  # fmt: skip
    assert counted == expected
    assert counted[("p", "delete", "failed")] == 1

    assert families["taskvisor_up"]["samples"] == {(): 1}
    assert families["taskvisor_queue_length"]["samples"] == {(("provider", "p"),): 0}
    workers = {dict(labels)["state"]: value for labels, value in families["taskvisor_workers"]["samples"].items()}
    assert workers == {"busy": 0, "idle": 2}
    memory = families["taskvisor_process_resident_memory_bytes"]["samples"]
    supervisor_labels = (("pid", str(supervisor.process.pid)), ("provider", ""), ("role", "supervisor"))
    assert memory[supervisor_labels] > 0
    assert families["taskvisor_process_cpu_seconds_total"]["type"] == "counter"
    assert len(families["taskvisor_process_cpu_seconds_total"]["samples"]) == len(memory) == 6
    sources = {dict(labels)["source"]: value for labels, value in families["taskvisor_source_up"]["samples"].items()}
    assert sources == {"database": 1, "redis": 1}


def test_metrics_label_escaping():
    assert escape_label_value('a\\b"c\nd') == 'a\\\\b\\"c\\nd'
    writer = MetricsWriter()
    writer.family("taskvisor_example", "gauge", "Help with a backslash \\ and a\nnewline.")
    writer.sample("taskvisor_example", {"value": 'quote " slash \\ newline \n end'}, 1.5)
    families = parse_prometheus(writer.text())
    assert families["taskvisor_example"]["samples"] == {(("value", 'quote " slash \\ newline \n end'),): 1.5}
    assert families["taskvisor_example"]["help"] == "Help with a backslash \\\\ and a\\nnewline."


# -- the health command ------------------------------------------------------------------


def health_command(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("TASKVISOR_CONFIG", None)
    argv = [sys.executable, "-m", "supervisor", "health", *args]
    return subprocess.run(argv, check=False, capture_output=True, text=True, env=env, timeout=60)


def health_command_exiting(expected_code: int, *args: str) -> subprocess.CompletedProcess | None:
    """Run the command and return its result when it exits with `expected_code`, else None."""
    result = health_command(*args)
    return result if result.returncode == expected_code else None


def config_copy(supervisor, tmp_path, **health: object):
    document = yaml.safe_load(supervisor.config_path.read_text())
    document["health"] = health
    path = tmp_path / f"copy-{len(list(tmp_path.glob('copy-*')))}.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


def test_health_command_exit_codes(ready_supervisor, tmp_path):
    supervisor, url = ready_supervisor()
    port = urlsplit(url).port
    with_port = config_copy(supervisor, tmp_path, port=port)

    ready = health_command("--config", str(with_port))
    assert ready.returncode == 0, ready.stderr
    assert ready.stdout.startswith(f"ready (http://127.0.0.1:{port}/readyz)")

    victim = worker_pid(url, "p", 0)
    os.kill(victim, signal.SIGSTOP)
    try:
        not_ready = wait_for(lambda: health_command_exiting(1, "--url", url), 10, "the command to report not ready")
        assert not_ready.stdout.startswith("not ready")
        assert f"pid {victim} is stopped" in not_ready.stdout
    finally:
        os.kill(victim, signal.SIGCONT)

    # A socket that is bound but not listening: connections to it are refused, and no
    # other program can take the port while the test keeps it bound.
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        closed_url = f"http://127.0.0.1:{closed.getsockname()[1]}"
        unreachable = health_command("--url", closed_url)
    assert unreachable.returncode == 2
    assert f"cannot reach the health endpoint at {closed_url}/readyz" in unreachable.stderr

    disabled = health_command("--config", str(config_copy(supervisor, tmp_path, enabled=False)))
    assert disabled.returncode == 2
    assert "health.enabled is false" in disabled.stderr
    chosen_at_start = health_command("--config", str(config_copy(supervisor, tmp_path, port=0)))
    assert chosen_at_start.returncode == 2
    assert "pass --url" in chosen_at_start.stderr
    wrong_scheme = health_command("--url", "ftp://127.0.0.1:21")
    assert wrong_scheme.returncode == 2
    assert "invalid value of --url" in wrong_scheme.stderr


def test_health_command_rejects_other_answers(ready_supervisor):
    _supervisor, url = ready_supervisor()
    # /status is a taskvisor page, but not a readiness verdict.
    other = health_command("--url", url + "/status/readyz")
    assert other.returncode == 2
    assert "HTTP 404" in other.stderr


# -- configuration ----------------------------------------------------------------------


def test_non_loopback_address_rejected(tmp_path):
    path = tmp_path / "open.yaml"
    path.write_text(yaml.safe_dump({"health": {"address": "0.0.0.0"}}))
    with pytest.raises(ConfigError) as error:
        load_config(path)
    message = str(error.value)
    assert "invalid value at health.address (value '0.0.0.0')" in message
    assert "no authentication" in message
    assert "health.allowNonLoopback: true" in message

    path.write_text(yaml.safe_dump({"health": {"address": "0.0.0.0", "allowNonLoopback": True}}))
    assert load_config(path).health.address == "0.0.0.0"
    path.write_text(yaml.safe_dump({"health": {"address": "::1"}}))
    assert load_config(path).health.address == "::1"
    path.write_text(yaml.safe_dump({"health": {"address": "localhost"}}))
    with pytest.raises(ConfigError, match="expected an IP address"):
        load_config(path)


def test_health_defaults():
    health = load_config(None).health
    assert (health.enabled, health.address, health.port) == (True, "127.0.0.1", 9180)
    assert (health.allow_non_loopback, health.heartbeat_timeout) == (False, 5.0)


# -- the heartbeat table ------------------------------------------------------------------


def test_silent_process_detected(redis_server, tmp_path):
    config = parse_config({"redis": {"url": redis_server.url}, "health": {"heartbeatTimeout": 2}}, "test", str(tmp_path))
    table = HeartbeatTable(slot_count=4)
    monitor = Monitor(config, table)
    index = table.assign("worker", "p", 0)
    table.set_pid(index, os.getpid())
    try:
        slot = table.read_slot(index)
        assert monitor.process_problem(slot, slot.started + 1) == f"worker p/0 pid {os.getpid()} is starting and has sent no heartbeat yet"
        assert "has sent no heartbeat in the 3.0 s since it started" in monitor.process_problem(slot, slot.started + 3)

        heartbeat.attach(table, index)
        heartbeat.beat()
        slot = table.read_slot(index)
        assert monitor.process_problem(slot, slot.heartbeat + 1) is None
        assert "has sent no heartbeat for 2.5 s (limit 2 s)" in monitor.process_problem(slot, slot.heartbeat + 2.5)

        # An announced retry delay extends the limit by its length.
        heartbeat.beat(pause=10)
        slot = table.read_slot(index)
        assert monitor.process_problem(slot, slot.heartbeat + 5) is None
        assert "limit 12 s" in monitor.process_problem(slot, slot.heartbeat + 13)
    finally:
        heartbeat.attach(None, -1)
        monitor.close()


def test_heartbeat_table_keeps_exit_records():
    table = HeartbeatTable(slot_count=3, exit_record_seconds=3600)
    first = table.assign("worker", "p", 0)
    table.set_pid(first, 1001)
    table.release(first, signal.SIGKILL, exit_requested=False)
    second = table.assign("worker", "p", 0)
    assert second != first, "an exit record younger than exit_record_seconds must not be reused while free slots exist"
    table.set_pid(second, 1002)
    assert table.read_slot(first).state == EXITED
    assert table.read_slot(second).state == LIVE

    # With every slot taken, the oldest exit record gives way.
    third = table.assign("worker", "p", 1)
    assert third == first
    table.set_pid(third, 1003)
    assert table.read_slot(third).pid == 1003
    assert table.assign("worker", "p", 2) == -1


def test_readyz_reports_mirror_lag(start_supervisor, script, redis_server):
    supervisor = start_supervisor({"p": command_provider(script, concurrent=2)},
                                  health={"heartbeatTimeout": 30, "mirrorLagLimit": 1})  # fmt: skip
    url = supervisor.health_url()
    wait_for(lambda: readiness(url)[0] == 200, 15, "/readyz to answer 200 after the start")
    _code, status = get_json(url, "/status")
    mirror = next(process["pid"] for process in status["processes"] if process["role"] == "mirror")

    os.kill(mirror, signal.SIGSTOP)
    try:
        redis_server.client().xadd("taskvisor:{p}:tasks", {"id": "lag-1", "type": "start", "instance": "vm-1", "user": "u"})
        reasons = wait_for(lambda: reason_about(url, "the SQL mirror is"), 10, "/readyz to report the mirror's lag")
        assert any("behind on provider p (limit 1 s, health.mirrorLagLimit)" in reason for reason in reasons), reasons
        assert_healthy(url)
    finally:
        os.kill(mirror, signal.SIGCONT)
    wait_for(lambda: readiness(url)[0] == 200, 10, "/readyz to recover once the mirror caught up")
