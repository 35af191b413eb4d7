"""`taskvisor top`: one frame with --once, the live redraw on a terminal, and Ctrl-C."""

import os
import pty
import re
import select
import signal
import subprocess
import sys
import time

import yaml
from click.testing import CliRunner

from supervisor.cli import cli
from supervisor.cli_top import CLEAR_BELOW, HIDE_CURSOR, HOME, SHOW_CURSOR
from tests.harness import REPO, task_hash, wait_for

SLEEPY = {"driver": {"type": "tests.sample_drivers:SleepyDriver"}, "allowConcurrentTasks": True, "maxConcurrentTasks": 2}


def top_once(config_path) -> str:
    result = CliRunner().invoke(cli, ["top", "--config", str(config_path), "--once"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_top_once_shows_providers_and_tasks(start_supervisor, redis_server):
    supervisor = start_supervisor({"p": SLEEPY})
    client = redis_server.client()
    stream = "taskvisor:{p}:tasks"
    client.xadd(stream, {"id": "quick-1", "type": "start", "instance": "vm-1", "user": "u", "data": '{"seconds": 0.1}'})
    wait_for(lambda: task_hash(client, "p", "quick-1").get("status") == "completed", 15, "the quick task to complete")
    client.xadd(stream, {"id": "long-1", "type": "start", "instance": "vm-2", "user": "u", "data": '{"seconds": 20}'})
    wait_for(lambda: float(task_hash(client, "p", "long-1").get("progress") or 0) >= 10, 15, "the long task to report progress")

    output = top_once(supervisor.config_path)
    assert "\x1b" not in output, "--once must print no terminal control sequences"
    assert "supervisors: 1" in output
    provider_row = re.search(r"^p +(\d+) +(\S+) +(\d+) +(\d+) +(\d+)$", output, re.MULTILINE)
    assert provider_row, output
    assert provider_row.groups() == ("2", "2", "1", "0", "1")
    assert "RUNNING TASKS (1)" in output
    task_row = re.search(r"^long-1 +p +start +vm-2 +(\d+) % +([\d.]+) s  step \d+$", output, re.MULTILINE)
    assert task_row, output
    assert 10 <= int(task_row.group(1)) <= 100
    assert float(task_row.group(2)) < 20


def test_top_strips_control_characters(redis_server, tmp_path):
    config_path = tmp_path / "top.yaml"
    config_path.write_text(yaml.safe_dump({
        "redis": {"url": redis_server.url},
        "providers": {"q": {"driver": {"type": "command", "commands": {"start": ["true"]}}}},
    }))  # fmt: skip
    client = redis_server.client()
    seconds, _micros = client.time()
    client.hset("taskvisor:{q}:busy", "test-q-0:1", f"evil-1 {seconds - 75}")
    client.hset("taskvisor:{q}:task:evil-1", mapping={"type": "stop", "instance": "vm-\x1b[2J", "progress": "50",
                                                      "message": "\x1b[31mred\x07 text"})  # fmt: skip
    output = top_once(config_path)
    assert "\x1b" not in output
    assert "\x07" not in output
    assert re.search(r"^evil-1 +q +stop +vm- \[2J +50 % +1m1\ds   \[31mred  text$", output, re.MULTILINE), output
    assert re.search(r"^q +0 +0 +1 +0 +0$", output, re.MULTILINE), output


def test_top_live_redraws_until_ctrl_c(redis_server, tmp_path):
    config_path = tmp_path / "top.yaml"
    config_path.write_text(yaml.safe_dump({"redis": {"url": redis_server.url}, "providers": {"p": SLEEPY}}))
    primary, secondary = pty.openpty()
    env = dict(os.environ, PYTHONPATH=str(REPO), COLUMNS="120", LINES="30")
    process = subprocess.Popen(
        [sys.executable, "-m", "supervisor", "top", "--config", str(config_path), "--interval", "0.2"],
        stdin=secondary, stdout=secondary, stderr=secondary, env=env, start_new_session=True,
    )  # fmt: skip
    os.close(secondary)

    output = b""
    try:
        deadline = time.monotonic() + 15
        while output.count(HOME.encode()) < 3 and time.monotonic() < deadline:
            if select.select([primary], [], [], 0.5)[0]:
                output += os.read(primary, 65536)
        assert output.count(HOME.encode()) >= 3, output[-2000:]

        # Ctrl-C on a terminal sends SIGINT to the foreground process.
        process.send_signal(signal.SIGINT)
        assert process.wait(10) == 0
        while select.select([primary], [], [], 0.2)[0]:
            try:
                chunk = os.read(primary, 65536)
            except OSError:
                break
            if not chunk:
                break
            output += chunk
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
        os.close(primary)

    text = output.decode("utf-8", "replace")
    assert text.startswith(HIDE_CURSOR)
    assert CLEAR_BELOW in text
    assert SHOW_CURSOR in text[text.rindex(CLEAR_BELOW):]
    assert "Traceback" not in text
    assert "PROVIDER" in text
    assert "RUNNING TASKS (0)" in text
