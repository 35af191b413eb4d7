"""CommandDriver and load_driver against real processes: scripts written to tmp_path."""

import os
import sys
import textwrap
import threading
import time

import psutil
import pytest

from shared.errors import DriverError, TaskFailed
from shared.settings import DriverConfig
from worker.drivers import load_driver
from worker.drivers.base import Driver, TaskContext
from worker.drivers.command import STDERR_TAIL_BYTES, STDERR_TAIL_LINES, CommandDriver

PROVIDER = "test-provider"


def wait_for(condition, timeout: float) -> bool:
    """Poll `condition` until it is true or `timeout` seconds pass, and return whether it became true."""
    deadline = time.monotonic() + timeout
    while True:
        if condition():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)


def write_script(directory, name: str, body: str) -> str:
    path = directory / name
    path.write_text(textwrap.dedent(body).lstrip())
    path.chmod(0o755)
    return str(path)


def write_python_script(directory, name: str, body: str) -> list[str]:
    """Write a Python script and return the argv prefix that runs it with this interpreter."""
    path = directory / name
    path.write_text(textwrap.dedent(body).lstrip())
    return [sys.executable, str(path)]


def make_driver(commands: dict, base_dir, **settings) -> CommandDriver:
    return CommandDriver(PROVIDER, DriverConfig(type="command", commands=commands, **settings), str(base_dir))


def make_context(task_type="create", instance="vm-1", data=None, timeout=30.0, kill_grace=1.0):
    reports = []
    context = TaskContext(
        task_id="task-1",
        provider=PROVIDER,
        task_type=task_type,
        instance=instance,
        user="alice",
        data=data if data is not None else {"password": "hunter2"},
        timeout=timeout,
        kill_grace=kill_grace,
        report_progress=lambda percent, message: reports.append((percent, message)),
    )
    return context, reports


class DriverThread:
    """Run a driver method in a thread, as the worker does, and keep its outcome."""

    def __init__(self, driver: Driver, context: TaskContext) -> None:
        self.result = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self.run, args=(driver.handler_for(context.task_type), context))
        self.thread.start()

    def run(self, method, context) -> None:
        try:
            self.result = method(context)
        except BaseException as exc:
            self.error = exc

    def join(self, timeout: float) -> bool:
        self.thread.join(timeout)
        return not self.thread.is_alive()


def read_pids(path) -> list[int] | None:
    """Return the pids a script wrote to `path`, or None while the line is incomplete."""
    if not path.exists():
        return None
    text = path.read_text()
    if not text.endswith("\n"):
        return None
    return [int(value) for value in text.split()]


def process_gone(pid: int) -> bool:
    return not psutil.pid_exists(pid)


# --- CommandDriver -----------------------------------------------------------


def test_success_progress_and_result(tmp_path):
    script = write_script(tmp_path, "create.sh", """
        #!/bin/bash
        cat > /dev/null
        echo "progress 10 copying image"
        echo "some log line"
        echo '{"step": 1}'
        echo "progress 100"
        echo "progress abc ignored"
        printf '{"ok": true, "ip": "10.0.0.5"}'
    """)
    driver = make_driver({"create": [script]}, tmp_path)
    context, reports = make_context()

    result = driver.create(context)

    assert result == {"ok": True, "ip": "10.0.0.5"}
    assert reports == [(10.0, "copying image"), (100.0, "")]


def test_success_without_result(tmp_path):
    script = write_script(tmp_path, "start.sh", "#!/bin/bash\necho started\n")
    driver = make_driver({"start": [script]}, tmp_path)
    context, _ = make_context(task_type="start")

    assert driver.start(context) is None


def test_nonzero_exit_stderr_tail(tmp_path):
    script = write_script(tmp_path, "fail.sh", """
        #!/bin/bash
        echo '{"partial": true}'
        for i in $(seq 1 30); do echo "error line $i" >&2; done
        exit 3
    """)
    driver = make_driver({"create": [script]}, tmp_path)
    context, _ = make_context()

    with pytest.raises(TaskFailed) as caught:
        driver.create(context)

    message = str(caught.value)
    assert message.startswith("command exited with status 3: ")
    assert message.endswith("error line 30")
    assert "error line 10\n" not in message
    assert message.count("\n") == STDERR_TAIL_LINES - 1
    assert caught.value.result == {"partial": True}


def test_stderr_tail_bounded(tmp_path):
    script = write_script(tmp_path, "noisy.sh", """
        #!/bin/bash
        head -c 1048576 /dev/zero | tr '\\0' 'x' >&2
        echo >&2
        echo "final error" >&2
        exit 1
    """)
    driver = make_driver({"create": [script]}, tmp_path)
    context, _ = make_context()

    with pytest.raises(TaskFailed) as caught:
        driver.create(context)

    message = str(caught.value)
    assert message.startswith("command exited with status 1: ")
    assert message.endswith("final error")
    assert len(message) <= STDERR_TAIL_BYTES + 100


def test_long_stdout_line_dropped(tmp_path):
    argv = write_python_script(tmp_path, "long_line.py", """
        import sys
        sys.stdin.read()
        sys.stdout.write('{"kept": true}\\n')
        sys.stdout.write('{"dropped": "' + "y" * 3_000_000 + '"}\\n')
    """)
    driver = make_driver({"create": argv}, tmp_path)
    context, _ = make_context()

    assert driver.create(context) == {"kept": True}


def test_signal_death_names_signal(tmp_path):
    script = write_script(tmp_path, "crash.sh", "#!/bin/bash\nkill -USR1 $$\n")
    driver = make_driver({"create": [script]}, tmp_path)
    context, _ = make_context()

    with pytest.raises(TaskFailed) as caught:
        driver.create(context)

    assert "killed by signal SIGUSR1" in str(caught.value)


def test_timeout_kills_group(tmp_path):
    pid_file = tmp_path / "pids"
    script = write_script(tmp_path, "stubborn.sh", f"""
        #!/bin/bash
        trap '' TERM
        sleep 600 &
        echo "$$ $!" > {pid_file}
        wait
    """)
    driver = make_driver({"create": [script]}, tmp_path)
    context, _ = make_context(timeout=1.0, kill_grace=0.5)
    started = time.monotonic()

    with pytest.raises(TaskFailed) as caught:
        driver.create(context)

    elapsed = time.monotonic() - started
    pids = read_pids(pid_file)
    assert pids is not None
    shell_pid, sleep_pid = pids
    assert context.stop_reason == "timeout"
    assert "timed out" in str(caught.value)
    assert "SIGKILL" in str(caught.value)
    assert elapsed < 1.0 + 0.5 + 2.0
    assert wait_for(lambda: process_gone(shell_pid), 5.0)
    assert wait_for(lambda: process_gone(sleep_pid), 5.0)


def test_cancel_within_grace(tmp_path):
    pid_file = tmp_path / "pids"
    script = write_script(tmp_path, "long.sh", f"""
        #!/bin/bash
        trap '' TERM
        sleep 600 &
        echo "$$ $!" > {pid_file}
        wait
    """)
    driver = make_driver({"create": [script]}, tmp_path)
    context, _ = make_context(kill_grace=1.0)
    runner = DriverThread(driver, context)
    assert wait_for(lambda: read_pids(pid_file) is not None, 10.0)

    requested = time.monotonic()
    context.stop("cancel")
    finished = runner.join(context.kill_grace + 1.0)

    assert finished
    assert time.monotonic() - requested <= context.kill_grace + 1.0
    assert isinstance(runner.error, TaskFailed)
    assert "cancelled" in str(runner.error)
    assert context.stop_reason == "cancel"
    for pid in read_pids(pid_file):
        assert wait_for(lambda pid=pid: process_gone(pid), 5.0)


def test_cancel_sigterm_suffices(tmp_path):
    marker = tmp_path / "started"
    script = write_script(tmp_path, "polite.sh", f"""
        #!/bin/bash
        touch {marker}
        exec sleep 600
    """)
    driver = make_driver({"create": [script]}, tmp_path)
    context, _ = make_context(kill_grace=30.0)
    runner = DriverThread(driver, context)
    assert wait_for(marker.exists, 10.0)

    context.stop("shutdown")

    assert runner.join(5.0)
    assert isinstance(runner.error, TaskFailed)
    assert str(runner.error) == "command stopped with SIGTERM because the worker is shutting down"


def test_cancelled_before_start(tmp_path):
    marker = tmp_path / "ran"
    script = write_script(tmp_path, "never.sh", f"#!/bin/bash\ntouch {marker}\n")
    driver = make_driver({"create": [script]}, tmp_path)
    context, _ = make_context()
    context.stop("cancel")

    with pytest.raises(TaskFailed, match="not started"):
        driver.create(context)

    assert not marker.exists()


def test_hostile_instance_one_argument(tmp_path):
    hostile = "x; rm -rf / $(touch pwned) `touch pwned2` 'quoted' \"double\" \n next"
    argv = write_python_script(tmp_path, "echo_argv.py", """
        import json, sys
        sys.stdin.read()
        print(json.dumps({"count": len(sys.argv) - 1, "args": sys.argv[1:]}))
    """)
    commands = {"delete": [*argv, "{instance}", "--name={instance}", "{user}", "{type}", "{id}", "{provider}"]}
    driver = make_driver(commands, tmp_path)
    context, _ = make_context(task_type="delete", instance=hostile)

    result = driver.delete(context)

    assert result["count"] == 6
    assert result["args"][0] == hostile
    assert result["args"][1] == "--name={instance}"
    assert result["args"][2:] == ["alice", "delete", "task-1", PROVIDER]
    assert not (tmp_path / "pwned").exists()
    assert not (tmp_path / "pwned2").exists()


def test_stdin_receives_task_json(tmp_path):
    argv = write_python_script(tmp_path, "echo_stdin.py", """
        import json, sys
        print(json.dumps({"stdin": json.loads(sys.stdin.read())}))
    """)
    driver = make_driver({"reset-password": argv}, tmp_path)
    context, _ = make_context(task_type="reset-password", data={"password": "s3cret", "nested": {"a": [1, 2]}})

    result = driver.handler_for("reset-password")(context)

    assert result["stdin"] == context.as_json_object()


def test_environment_and_workdir(tmp_path):
    (tmp_path / "sub").mkdir()
    argv = write_python_script(tmp_path, "echo_env.py", """
        import json, os
        names = ["TASKVISOR_TASK_ID", "TASKVISOR_PROVIDER", "TASKVISOR_TASK_TYPE", "TASKVISOR_INSTANCE", "EXTRA", "PATH"]
        print(json.dumps({"cwd": os.getcwd(), "env": {name: os.environ.get(name) for name in names}}))
    """)
    driver = make_driver({"restart": argv}, tmp_path, workdir="sub", env={"EXTRA": "value"})
    context, _ = make_context(task_type="restart")

    result = driver.restart(context)

    assert result["cwd"] == str(tmp_path / "sub")
    assert result["env"]["TASKVISOR_TASK_ID"] == "task-1"
    assert result["env"]["TASKVISOR_PROVIDER"] == PROVIDER
    assert result["env"]["TASKVISOR_TASK_TYPE"] == "restart"
    assert result["env"]["TASKVISOR_INSTANCE"] == "vm-1"
    assert result["env"]["EXTRA"] == "value"
    assert result["env"]["PATH"] == os.environ["PATH"]


@pytest.mark.parametrize("size", [60_000, 1_000_000])
def test_unread_large_stdin(tmp_path, size):
    script = write_script(tmp_path, "ignore_stdin.sh", """
        #!/bin/bash
        echo '{"done": true}'
    """)
    driver = make_driver({"create": [script]}, tmp_path)
    context, _ = make_context(data={"blob": "x" * size}, timeout=20.0)
    started = time.monotonic()

    result = driver.create(context)

    assert result == {"done": True}
    assert time.monotonic() - started < 5.0


def test_background_child_keeps_stdout(tmp_path):
    pid_file = tmp_path / "pids"
    script = write_script(tmp_path, "daemon.sh", f"""
        #!/bin/bash
        sleep 600 &
        echo "$!" > {pid_file}
        echo '{{"started": true}}'
    """)
    driver = make_driver({"start": [script]}, tmp_path)
    context, _ = make_context(task_type="start", timeout=20.0)
    started = time.monotonic()

    try:
        result = driver.start(context)
        elapsed = time.monotonic() - started
    finally:
        for pid in read_pids(pid_file) or []:
            child = psutil.Process(pid)
            child.kill()
            # The test process is the subreaper of the re-parented sleep, so reap it here.
            child.wait(5.0)

    assert result == {"started": True}
    assert elapsed < 5.0


def test_missing_executable(tmp_path):
    path = str(tmp_path / "no-such-script.sh")
    driver = make_driver({"create": [path]}, tmp_path)
    context, _ = make_context()

    with pytest.raises(TaskFailed) as caught:
        driver.create(context)

    assert path in str(caught.value)
    assert "No such file or directory" in str(caught.value)


def test_not_executable(tmp_path):
    path = tmp_path / "plain.sh"
    path.write_text("#!/bin/bash\necho hi\n")
    driver = make_driver({"create": [str(path)]}, tmp_path)
    context, _ = make_context()

    with pytest.raises(TaskFailed) as caught:
        driver.create(context)

    assert str(path) in str(caught.value)
    assert "Permission denied" in str(caught.value)


def test_no_command_for_type(tmp_path):
    driver = make_driver({"create": ["/bin/true"]}, tmp_path)
    context, _ = make_context(task_type="delete")

    with pytest.raises(TaskFailed) as caught:
        driver.handler_for("delete")(context)

    assert str(caught.value) == f"provider {PROVIDER} has no command for task type delete"


# --- load_driver -------------------------------------------------------------


DRIVER_MODULE = """
from worker.drivers.base import Driver

class GoodDriver(Driver):
    pass

class BrokenDriver(Driver):
    def __init__(self, provider, options):
        raise RuntimeError("missing option 'endpoint'")

class NotADriver:
    pass
"""


@pytest.fixture
def driver_module(tmp_path, monkeypatch):
    (tmp_path / "tv_test_drivers.py").write_text(DRIVER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "tv_test_drivers"
    sys.modules.pop("tv_test_drivers", None)


def test_load_command_driver(tmp_path):
    driver = load_driver(PROVIDER, DriverConfig(type="command", commands={"create": ["/bin/true"]}), str(tmp_path))

    assert isinstance(driver, CommandDriver)


def test_load_python_driver(driver_module, tmp_path):
    config = DriverConfig(type=f"{driver_module}:GoodDriver", options={"endpoint": "local"})

    driver = load_driver(PROVIDER, config, str(tmp_path))

    assert type(driver).__name__ == "GoodDriver"
    assert driver.provider == PROVIDER
    assert driver.options == {"endpoint": "local"}


@pytest.mark.parametrize(
    ("type_value", "cause"),
    [
        ("tv_no_such_module:Driver", "module not found"),
        ("{module}:MissingDriver", "has no class MissingDriver"),
        ("{module}:NotADriver", "is not a subclass of worker.drivers.base.Driver"),
        ("{module}:BrokenDriver", "missing option 'endpoint'"),
        ("no_class_given", "invalid driver type"),
    ],
)
def test_load_driver_errors(driver_module, tmp_path, type_value, cause):
    type_value = type_value.format(module=driver_module)

    with pytest.raises(DriverError) as caught:
        load_driver(PROVIDER, DriverConfig(type=type_value), str(tmp_path))

    assert PROVIDER in str(caught.value)
    assert type_value in str(caught.value)
    assert cause in str(caught.value)
