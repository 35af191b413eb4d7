"""Log output: the JSON format in every process, repeat suppression and password masking."""

import io
import logging

import orjson
import pytest

from shared.logs import JsonFormatter, TaskvisorHandler, parse_key_values, setup_logging
from tests.harness import command_provider, task_hash, wait_for, write_script

SECRET = "n3w-Secret-value"


def test_json_logs_from_every_process(start_supervisor, redis_server, tmp_path, monkeypatch):
    monkeypatch.setenv("TASKVISOR_LOG_FORMAT", "json")
    # The command echoes the task data, secret included, into its error output and fails.
    script = write_script(tmp_path / "op.sh", 'cat >&2\nexit 1\n')
    supervisor = start_supervisor({"p": command_provider(script)})
    client = redis_server.client()
    data = orjson.dumps({"username": "root", "password": SECRET}).decode()
    client.xadd("taskvisor:{p}:tasks", {"id": "j-1", "type": "reset-password", "instance": "vm-1", "user": "u", "data": data})
    wait_for(lambda: task_hash(client, "p", "j-1").get("status") == "failed", 15, "the task to fail")
    wait_for(lambda: "task ended task_id=j-1" in supervisor.log(), 5, "the worker to log the end")
    supervisor.stop()

    lines = supervisor.log().splitlines()
    assert lines
    records = []
    for line in lines:
        record = orjson.loads(line)
        assert {"time", "level", "role", "pid", "logger", "message"} <= set(record), record
        assert record["time"].endswith("Z")
        records.append(record)
    assert {"supervisor", "intake", "mirror", "worker:p:0"} <= {record["role"] for record in records}

    ended = next(record for record in records if record["message"].startswith("task ended"))
    assert (ended["task_id"], ended["provider"], ended["status"], ended["level"]) == ("j-1", "p", "failed", "WARNING")
    assert ended["logger"] == "worker.main"
    assert ended["pid"] == int(ended["message"].split(" pid=")[1].split()[0])
    assert "***" in ended["error"]
    assert SECRET not in supervisor.log()


def test_task_lines_quick_and_long(start_supervisor, redis_server, tmp_path):
    """A quick task writes only its end line; one that runs past a second also writes a running line."""
    script = write_script(tmp_path / "op.sh", 'cat >/dev/null\nif [ "$2" = slow ]; then sleep 1.5; fi\necho "{}"\n')
    supervisor = start_supervisor({"p": command_provider(script)})
    client = redis_server.client()
    client.xadd("taskvisor:{p}:tasks", {"id": "quick-1", "type": "start", "instance": "fast", "user": "u"})
    client.xadd("taskvisor:{p}:tasks", {"id": "slow-1", "type": "start", "instance": "slow", "user": "u"})
    wait_for(lambda: "task ended task_id=slow-1" in supervisor.log(), 15, "the slow task to end")
    log_text = supervisor.log()

    # The command driver logs its process's start and end under worker.drivers.command.
    worker_lines = [line for line in log_text.splitlines() if " worker.main: " in line]
    quick = [line for line in worker_lines if "task_id=quick-1" in line]
    assert len(quick) == 1
    assert "task ended task_id=quick-1 provider=p type=start instance=fast attempt=1 status=completed" in quick[0]
    running = [line for line in worker_lines if "task running task_id=slow-1" in line]
    assert len(running) == 1
    assert "instance=slow attempt=1" in running[0]
    assert float(running[0].split(" seconds=")[1].split()[0]) >= 1.0


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def limited():
    """A text handler on a StringIO with a clock the test moves; returns (logger, stream, clock, handler)."""
    stream, clock = io.StringIO(), FakeClock()
    setup_logging("INFO", stream=stream)
    handler = logging.getLogger().handlers[0]
    handler.clock = clock
    yield logging.getLogger("test.repeats"), stream, clock, handler
    setup_logging("WARNING")


def test_repeated_warning_suppressed(limited):
    log, stream, clock, _handler = limited
    for _ in range(5):
        log.warning("redis unavailable retry_in=5.0s error=refused")
    for _ in range(3):
        log.info("an info line is never suppressed")
    lines = stream.getvalue().splitlines()
    assert sum("redis unavailable" in line for line in lines) == 1
    assert sum("an info line" in line for line in lines) == 3

    clock.now += 31
    log.warning("another warning")
    lines = stream.getvalue().splitlines()
    assert lines[-2].endswith("redis unavailable retry_in=5.0s error=refused (repeated 4 times in 31 s)")
    assert "WARNING" in lines[-2]
    assert lines[-1].endswith("another warning")

    # After the window the same line is written again and starts a new window.
    log.warning("redis unavailable retry_in=5.0s error=refused")
    assert stream.getvalue().splitlines()[-1].endswith("error=refused")


def test_repeats_reported_at_close(limited):
    log, stream, _clock, handler = limited
    log.error("database write failed error=gone")
    log.error("database write failed error=gone")
    log.error("database write failed error=gone")
    handler.close()
    assert stream.getvalue().splitlines()[-1].endswith("database write failed error=gone (repeated 2 times in 0 s)")


def test_forked_child_forgets_parent_repeats(limited):
    log, stream, _clock, handler = limited
    log.warning("same line")
    # As in a child right after the fork: the handler belongs to another pid.
    handler.pid = -1
    log.warning("same line")
    assert stream.getvalue().count("same line") == 2


def test_json_repeat_summary():
    stream, clock = io.StringIO(), FakeClock()
    handler = TaskvisorHandler(stream, clock=clock, window=10)
    handler.setFormatter(JsonFormatter())
    log = logging.getLogger("test.json.repeats")
    log.propagate = False
    log.addHandler(handler)
    try:
        for _ in range(3):
            log.warning("lease renewal failed task_id=t-1 provider=p error=timeout reading from socket")
        clock.now += 11
        handler.flush_repeats()
    finally:
        log.removeHandler(handler)
    first, summary = (orjson.loads(line) for line in stream.getvalue().splitlines())
    assert "repeated" not in first
    assert (summary["repeated"], summary["repeat_seconds"]) == (2, 11)
    assert summary["error"] == "timeout reading from socket"
    assert summary["task_id"] == "t-1"


def test_url_passwords_masked_in_both_formats():
    for log_format in ("text", "json"):
        stream = io.StringIO()
        setup_logging("INFO", log_format, stream=stream)
        try:
            logging.getLogger("test.mask").error("cannot connect to mysql://panel:s3cr3t-pw@127.0.0.1:3306/panel: refused")
        finally:
            setup_logging("WARNING")
        output = stream.getvalue()
        assert "s3cr3t-pw" not in output, log_format
        assert "mysql://panel:***@127.0.0.1:3306/panel" in output, log_format


def test_key_value_parsing():
    message = "task ended task_id=t-1 provider=p status=failed seconds=0.2 pid=7 error='exit 1: no such vm'"
    assert parse_key_values(message) == {
        "task_id": "t-1", "provider": "p", "status": "failed", "seconds": "0.2", "pid": "7", "error": "exit 1: no such vm",
    }  # fmt: skip
    # A quoted error is decoded, escapes included.
    assert parse_key_values("""x error="it's gone;" """.strip()) == {"error": "it's gone;"}
    assert parse_key_values(r"x error='line one\nline two'") == {"error": "line one\nline two"}
    # Quotes that repr() would not write stay as they are.
    assert parse_key_values("x error='a' 'b'") == {"error": "'a' 'b'"}
    assert parse_key_values("x reason=plain text, no quotes") == {"reason": "plain text, no quotes"}
    tagged = parse_key_values("task_id=t-1 provider=p command_pid=4242: started start command ./op.sh")
    assert tagged == {"task_id": "t-1", "provider": "p", "command_pid": "4242"}
    assert parse_key_values("overdue task ended timeout=300s; its worker did not end it") == {"timeout": "300s"}
    assert parse_key_values("no pairs here") == {}


def test_log_format_rejects_unknown_value():
    from click.testing import CliRunner

    from supervisor.cli import cli

    result = CliRunner().invoke(cli, ["--log-format", "xml", "stats"])
    assert result.exit_code == 2
    assert "Invalid value for '--log-format'" in result.output
