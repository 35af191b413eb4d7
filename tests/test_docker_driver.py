"""The docker driver against a real Podman engine that serves the Docker Engine API on a private socket."""

import http.client
import json
import socket
import tempfile
import threading
import time
import uuid
from pathlib import Path

import psutil
import pytest

from shared.errors import ConfigError, DriverError, TaskFailed
from shared.settings import DriverConfig, parse_config
from shared.store import open_store
from tests.harness import task_hash, wait_for
from tests.podman_engine import TEST_IMAGE, PodmanEngine, require_tools
from worker.drivers import load_driver
from worker.drivers.base import TaskContext
from worker.drivers.docker import (
    LABEL_RESET_START,
    LABEL_TASK,
    DockerDriver,
    generated_name,
    parse_create_data,
)

# A shell loop that exits on SIGTERM within one sleep step.
POLITE_COMMAND = ["sh", "-c", "trap 'exit 0' TERM; while true; do sleep 0.1; done"]
# A shell loop that ignores SIGTERM, so only SIGKILL stops it.
STUBBORN_COMMAND = ["sh", "-c", "trap '' TERM; while true; do sleep 0.1; done"]


@pytest.fixture(scope="session")
def podman(tmp_path_factory):
    require_tools()
    # Podman refuses a --runroot longer than 50 characters, which pytest's temporary
    # folders can exceed (under pytest-xdist), so the engine gets a short folder of its own.
    engine = PodmanEngine(Path(tempfile.mkdtemp(prefix="tv-podman-", dir="/tmp")))
    try:
        engine.start()
        yield engine
    finally:
        engine.stop()


@pytest.fixture
def driver(podman) -> DockerDriver:
    return DockerDriver("dock", {"endpoint": podman.endpoint, "network": "none", "stopTimeout": 5})


def unique_name() -> str:
    return f"t-{uuid.uuid4().hex[:10]}"


def make_context(task_type: str, instance: str = "", data: dict | None = None, timeout: float = 30.0,
                 task_id: str | None = None) -> TaskContext:
    return TaskContext(
        task_id=task_id or f"task-{uuid.uuid4().hex[:10]}", provider="dock", task_type=task_type, instance=instance,
        user="u", data=data or {}, timeout=timeout, kill_grace=1.0, report_progress=lambda percent, message: None,
    )  # fmt: skip


def api(engine: PodmanEngine, method: str, path: str) -> tuple[int, dict | None]:
    """Call the engine directly, without the driver, to check what the driver did."""
    connection = http.client.HTTPConnection("localhost", timeout=10)
    connection.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    connection.sock.connect(str(engine.socket_path))
    try:
        connection.request(method, path)
        response = connection.getresponse()
        body = response.read()
        return response.status, json.loads(body) if body else None
    finally:
        connection.close()


def inspect(engine: PodmanEngine, name: str) -> dict | None:
    status, info = api(engine, "GET", f"/containers/{name}/json")
    assert status in (200, 404), f"inspect {name}: HTTP {status} {info}"
    return info if status == 200 else None


def create_container(driver: DockerDriver, name: str, command: list[str] = POLITE_COMMAND, **data) -> dict:
    context = make_context("create", name, {"image": TEST_IMAGE, "command": command, **data})
    return driver.create(context)


def run_task(driver: DockerDriver, task_type: str, name: str, **data) -> dict:
    context = make_context(task_type, name, data)
    return driver.handler_for(task_type)(context)


def test_create_applies_limits(driver, podman):
    name = unique_name()
    context = make_context("create", name, {"image": TEST_IMAGE, "memory": "64m", "cpus": 0.5,
                                            "env": {"GREETING": "hello"}, "command": POLITE_COMMAND})
    result = driver.create(context)

    info = inspect(podman, name)
    assert result == {"instance": name, "containerId": info["Id"]}
    assert info["State"]["Status"] == "created"
    assert info["HostConfig"]["Memory"] == 64 * 1024 * 1024
    assert info["HostConfig"]["NanoCpus"] == 500_000_000
    assert info["HostConfig"]["NetworkMode"] == "none"
    assert "GREETING=hello" in info["Config"]["Env"]
    assert info["Config"]["Cmd"] == POLITE_COMMAND
    assert info["Config"]["Labels"][LABEL_TASK] == context.task_id


def test_start_restart_stop(driver, podman):
    name = unique_name()
    create_container(driver, name, memory="32m")

    assert run_task(driver, "start", name) == {"instance": name, "state": "running"}
    first = inspect(podman, name)["State"]
    assert first["Running"] is True
    # cgroup v2 names the limit memory.max, cgroup v1 memory/memory.limit_in_bytes.
    read_limit = "cat /sys/fs/cgroup/memory.max 2>/dev/null || cat /sys/fs/cgroup/memory/memory.limit_in_bytes"
    limit = podman.podman("exec", name, "sh", "-c", read_limit)
    assert limit.stdout.strip() == str(32 * 1024 * 1024)

    assert run_task(driver, "restart", name) == {"instance": name, "state": "running"}
    second = inspect(podman, name)["State"]
    assert second["Running"] is True
    assert second["StartedAt"] != first["StartedAt"]

    started = time.monotonic()
    assert run_task(driver, "stop", name) == {"instance": name, "state": "exited"}
    assert time.monotonic() - started < 3
    assert inspect(podman, name)["State"]["Status"] == "exited"
    assert run_task(driver, "stop", name) == {"instance": name, "state": "exited"}


def test_delete_removes_container(driver, podman):
    name = unique_name()
    create_container(driver, name)
    run_task(driver, "start", name)

    assert run_task(driver, "delete", name) == {"instance": name, "removed": True}
    assert inspect(podman, name) is None
    assert run_task(driver, "delete", name) == {"instance": name, "removed": False}


def test_create_without_instance_returns_name(driver, podman):
    for task_id in ("task-7", "dock:1700000000000-0"):
        context = make_context("create", "", {"image": TEST_IMAGE, "command": POLITE_COMMAND}, task_id=task_id)
        result = driver.create(context)

        assert result["instance"] == generated_name("taskvisor-", task_id)
        assert result["instance"].startswith("taskvisor-")
        assert result["containerId"] == inspect(podman, result["instance"])["Id"]
        assert driver.probe(context).result == result
        run_task(driver, "delete", result["instance"])
    assert generated_name("taskvisor-", "task-7") == "taskvisor-task-7"
    assert generated_name("taskvisor-", "a:b") != generated_name("taskvisor-", "a-b")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"memory": "64m"}, "data.image is missing"),
        ({"image": ""}, "invalid data.image (value '')"),
        ({"image": TEST_IMAGE, "memory": "12q"}, "invalid data.memory (value '12q'): expected a whole number of bytes"),
        ({"image": TEST_IMAGE, "memory": 1024}, "invalid data.memory (value 1024)"),
        ({"image": TEST_IMAGE, "memory": True}, "invalid data.memory (value True)"),
        ({"image": TEST_IMAGE, "cpus": -1}, "invalid data.cpus (value -1)"),
        ({"image": TEST_IMAGE, "cpus": "many"}, "invalid data.cpus (value 'many')"),
        ({"image": TEST_IMAGE, "env": {"PORT": 80}}, "invalid data.env.PORT: expected a string"),
        ({"image": TEST_IMAGE, "env": {"1X": "a"}}, "invalid variable name '1X' in data.env"),
        ({"image": TEST_IMAGE, "command": "sleep 5"}, "invalid data.command (value 'sleep 5')"),
        ({"image": TEST_IMAGE, "memroy": "64m"}, "unknown field data.memroy"),
    ],
)
def test_create_rejects_bad_data(driver, podman, data, message):
    name = unique_name()
    with pytest.raises(TaskFailed) as failure:
        driver.create(make_context("create", name, data))
    assert message in str(failure.value)
    assert inspect(podman, name) is None


def test_memory_units():
    assert parse_create_data({"image": "x", "memory": "1.5g"}).memory == 1536 * 1024 * 1024
    assert parse_create_data({"image": "x", "memory": "512M"}).memory == 512 * 1024 * 1024
    assert parse_create_data({"image": "x", "memory": 8388608}).memory == 8388608
    assert parse_create_data({"image": "x", "cpus": "2"}).nano_cpus == 2_000_000_000


def test_engine_errors_carry_status(driver, podman):
    name = unique_name()
    with pytest.raises(TaskFailed) as missing_image:
        driver.create(make_context("create", name, {"image": "localhost/absent:1"}))
    assert "create container" in str(missing_image.value)
    assert "HTTP 404" in str(missing_image.value)
    assert "absent" in str(missing_image.value)

    with pytest.raises(TaskFailed) as missing_container:
        run_task(driver, "start", name)
    assert f"start container {name} failed: the engine returned HTTP 404" in str(missing_container.value)
    assert "no such container" in str(missing_container.value)

    create_container(driver, name)
    with pytest.raises(TaskFailed) as taken:
        create_container(driver, name)
    assert "HTTP 409" in str(taken.value) or "HTTP 500" in str(taken.value)
    assert "already in use" in str(taken.value)

    with pytest.raises(TaskFailed) as bad_name:
        run_task(driver, "start", "bad name")
    assert "instance 'bad name' is not a valid container name" in str(bad_name.value)


def test_unreachable_engine(tmp_path):
    driver = DockerDriver("dock", {"endpoint": f"unix://{tmp_path}/missing.sock"})
    with pytest.raises(TaskFailed) as failure:
        run_task(driver, "start", "vm-1")
    assert f"cannot connect to the engine at unix://{tmp_path}/missing.sock" in str(failure.value)


def test_reset_recreates_container(driver, podman):
    name = unique_name()
    create_container(driver, name, memory="48m", cpus=0.25, env={"GREETING": "hello"})
    run_task(driver, "start", name)
    podman.podman("exec", name, "touch", "/tmp/marker")
    before = inspect(podman, name)

    context = make_context("reset", name)
    result = driver.reset(context)

    after = inspect(podman, name)
    assert result == {"instance": name, "containerId": after["Id"], "previousContainerId": before["Id"],
                      "state": "running"}
    assert after["Id"] != before["Id"]
    assert after["State"]["Running"] is True
    assert after["HostConfig"]["Memory"] == 48 * 1024 * 1024
    assert after["HostConfig"]["NanoCpus"] == 250_000_000
    assert "GREETING=hello" in after["Config"]["Env"]
    assert after["Config"]["Cmd"] == POLITE_COMMAND
    assert after["Config"]["Labels"][LABEL_TASK] == context.task_id
    assert podman.podman("exec", name, "ls", "/tmp/marker", check=False).returncode != 0


def test_reset_keeps_stopped_container_stopped(driver, podman):
    name = unique_name()
    create_container(driver, name)
    before = inspect(podman, name)

    result = run_task(driver, "reset", name)

    assert result["state"] == "created"
    assert result["containerId"] != before["Id"]
    assert inspect(podman, name)["State"]["Running"] is False


def test_reset_password_changes_shadow(driver, podman, caplog):
    caplog.set_level("DEBUG")
    name = unique_name()
    create_container(driver, name)
    run_task(driver, "start", name)
    password = "N3w-Secret-pw"

    result = run_task(driver, "reset-password", name, username="admin", password=password)

    assert result == {"instance": name, "username": "admin"}
    assert password not in json.dumps(result)
    assert password not in caplog.text
    shadow = podman.podman("exec", name, "cat", "/etc/shadow").stdout
    entries = dict(line.split(":", 2)[:2] for line in shadow.splitlines())
    assert entries["root"] == "*"
    salt = entries["admin"].split("$")[2]
    expected = podman.podman("exec", name, "mkpasswd", "-m", "sha512", password, salt).stdout.strip()
    assert entries["admin"] == expected


def test_reset_password_errors(driver, podman):
    name = unique_name()
    create_container(driver, name)

    with pytest.raises(TaskFailed) as stopped:
        run_task(driver, "reset-password", name, username="admin", password="Secret-1234")
    assert f"reset-password in container {name} failed: the engine returned HTTP" in str(stopped.value)
    assert "Secret-1234" not in str(stopped.value)

    run_task(driver, "start", name)
    with pytest.raises(TaskFailed) as unknown:
        run_task(driver, "reset-password", name, username="nobody", password="Secret-1234")
    assert "chpasswd exited with status 1: chpasswd: user 'nobody' does not exist" in str(unknown.value)

    with pytest.raises(TaskFailed, match="data.password is missing"):
        run_task(driver, "reset-password", name, username="admin")
    with pytest.raises(TaskFailed) as newline:
        run_task(driver, "reset-password", name, password="two\nlines")
    assert "invalid data.password" in str(newline.value)
    assert "two" not in str(newline.value)


def test_cancel_during_long_stop(podman):
    driver = DockerDriver("dock", {"endpoint": podman.endpoint, "network": "none", "stopTimeout": 30})
    name = unique_name()
    create_container(driver, name, command=STUBBORN_COMMAND)
    run_task(driver, "start", name)
    context = make_context("stop", name, timeout=120)
    outcome: list[Exception | dict] = []

    def run() -> None:
        try:
            outcome.append(driver.stop(context))
        except TaskFailed as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    time.sleep(0.5)
    cancelled_at = time.monotonic()
    context.stop("cancel")
    thread.join(5)

    assert not thread.is_alive()
    assert time.monotonic() - cancelled_at < 1
    assert isinstance(outcome[0], TaskFailed)
    assert str(outcome[0]) == f"stop container {name} interrupted because the task was cancelled"
    # The engine still waits out its 30 s grace; the driver stopped waiting for it.
    state = inspect(podman, name)["State"]
    assert state["Status"] in ("running", "stopping")

    # Podman 4.3 leaves the processes of a container in that state running when it is only
    # removed with force, so delete must kill them.
    assert run_task(driver, "delete", name)["removed"] is True
    wait_for(lambda: not psutil.pid_exists(state["Pid"]) or psutil.Process(state["Pid"]).status() == "zombie",
             5, "the container's process to end")


def test_stop_grace_fits_the_timeout(podman):
    driver = DockerDriver("dock", {"endpoint": podman.endpoint, "network": "none", "stopTimeout": 30})
    name = unique_name()
    create_container(driver, name, command=STUBBORN_COMMAND)
    run_task(driver, "start", name)

    started = time.monotonic()
    result = driver.stop(make_context("stop", name, timeout=3))

    assert result == {"instance": name, "state": "exited"}
    assert time.monotonic() - started < 3


def test_probe_answers(driver, podman):
    name = unique_name()
    create_task = make_context("create", name, {"image": TEST_IMAGE, "command": POLITE_COMMAND})
    assert driver.probe(create_task).outcome == "not_done"
    created = driver.create(create_task)
    answer = driver.probe(create_task)
    assert (answer.outcome, answer.result) == ("completed", created)
    other_create = make_context("create", name)
    answer = driver.probe(other_create)
    assert answer.outcome == "failed"
    assert answer.error == f"container {name} exists but task {other_create.task_id} did not create it"

    reset_task = make_context("reset", name)
    assert driver.probe(reset_task).outcome == "not_done"
    reset = driver.reset(reset_task)
    answer = driver.probe(reset_task)
    assert answer.outcome == "completed"
    assert answer.result == {"instance": name, "containerId": reset["containerId"], "state": "created"}

    delete_task = make_context("delete", name)
    assert driver.probe(delete_task).outcome == "not_done"
    driver.delete(delete_task)
    answer = driver.probe(delete_task)
    assert (answer.outcome, answer.result) == ("completed", {"instance": name, "removed": True})

    answer = driver.probe(reset_task)
    assert answer.outcome == "failed"
    assert f"container {name} does not exist: the interrupted reset may have removed it" in answer.error
    assert driver.probe(make_context("start", name)).outcome == "not_done"


def test_probe_reset_not_started(driver, podman):
    name = unique_name()
    reset_task = make_context("reset", name)
    spec = parse_create_data({"image": TEST_IMAGE, "command": POLITE_COMMAND})
    driver.create_container(name, spec, None, reset_task.task_id, {LABEL_RESET_START: "true"})

    answer = driver.probe(reset_task)

    assert answer.outcome == "failed"
    assert f"recreated container {name} but did not start it" in answer.error


class UnixForwarder:
    """A loopback TCP port that forwards each connection to a unix socket, to reach the engine over TCP."""

    def __init__(self, socket_path: Path) -> None:
        self.socket_path = socket_path
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen()
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            upstream.connect(str(self.socket_path))
            threading.Thread(target=self.pump, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self.pump, args=(upstream, client), daemon=True).start()

    @staticmethod
    def pump(source: socket.socket, target: socket.socket) -> None:
        try:
            while chunk := source.recv(65536):
                target.sendall(chunk)
            target.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close(self) -> None:
        self.listener.close()


def test_tcp_endpoint(podman):
    forwarder = UnixForwarder(podman.socket_path)
    try:
        driver = DockerDriver("dock", {"endpoint": f"tcp://127.0.0.1:{forwarder.port}", "network": "none"})
        name = unique_name()
        create_container(driver, name)
        assert run_task(driver, "start", name)["state"] == "running"
        assert run_task(driver, "reset-password", name, username="admin", password="Tcp-Secret-1") == {
            "instance": name, "username": "admin"}
        assert run_task(driver, "delete", name)["removed"] is True
    finally:
        forwarder.close()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({}, "missing required key 'endpoint' under providers.dock.driver.options"),
        ({"endpoint": "/run/engine.sock"},
         "invalid value at providers.dock.driver.options.endpoint (value '/run/engine.sock'): expected unix:///"),
        ({"endpoint": "https://127.0.0.1:2376"},
         "(value 'https://127.0.0.1:2376'): expected unix:///absolute/path.sock"),
        ({"endpoint": "tcp://127.0.0.1"}, "(value 'tcp://127.0.0.1')"),
        ({"endpoint": "unix:///x.sock", "stopTimout": 3},
         "unknown key 'stopTimout' under providers.dock.driver.options; did you mean 'stopTimeout'?"),
        ({"endpoint": "unix:///x.sock", "stopTimeout": -1}, "providers.dock.driver.options.stopTimeout (value -1)"),
        ({"endpoint": "unix:///x.sock", "requestTimeout": "5"},
         "providers.dock.driver.options.requestTimeout (value '5')"),
        ({"endpoint": "unix:///x.sock", "namePrefix": "-x"}, "providers.dock.driver.options.namePrefix (value '-x')"),
        ({"endpoint": "unix:///x.sock", "apiVersion": 1.41}, "providers.dock.driver.options.apiVersion (value 1.41)"),
    ],
)
def test_options_errors_name_key_and_value(options, message):
    document = {"providers": {"dock": {"driver": {"type": "docker", "options": options}}}}
    with pytest.raises(ConfigError) as failure:
        parse_config(document, "taskvisor.yaml", "/")
    assert message in str(failure.value)
    assert str(failure.value).startswith("taskvisor.yaml: ")

    with pytest.raises(DriverError, match="provider dock: driver docker: "):
        load_driver("dock", DriverConfig(type="docker", options=options), "/")


def test_load_driver_selects_docker():
    document = {"providers": {"dock": {"driver": {"type": "docker", "options": {
        "endpoint": "tcp://127.0.0.1:2375", "apiVersion": "1.41", "requestTimeout": 5, "stopTimeout": 3}}}}}
    settings = parse_config(document, "x", "/").providers["dock"].driver
    driver = load_driver("dock", settings, "/")
    assert isinstance(driver, DockerDriver)
    assert driver.settings.address == ("tcp", "127.0.0.1", 2375)
    assert driver.engine.url("/containers/x/json") == "/v1.41/containers/x/json"


def test_supervisor_runs_docker_tasks(podman, start_supervisor, redis_server, sqlite_url):
    options = {"endpoint": podman.endpoint, "network": "none", "stopTimeout": 2}
    start_supervisor({"dock": {"driver": {"type": "docker", "options": options}}})
    client = redis_server.client()
    name = unique_name()
    data = json.dumps({"image": TEST_IMAGE, "memory": "32m", "command": POLITE_COMMAND})
    stream = "taskvisor:{dock}:tasks"
    client.xadd(stream, {"id": f"{name}-create", "type": "create", "instance": name, "user": "u", "data": data})
    client.xadd(stream, {"id": f"{name}-start", "type": "start", "instance": name, "user": "u"})
    ids = [f"{name}-create", f"{name}-start"]

    wait_for(lambda: task_hash(client, "dock", ids[1]).get("status") in ("completed", "failed"), 30, "the start task")
    assert task_hash(client, "dock", ids[1])["status"] == "completed", task_hash(client, "dock", ids[1])
    assert inspect(podman, name)["State"]["Running"] is True
    created = json.loads(task_hash(client, "dock", ids[0])["result"])
    assert created == {"instance": name, "containerId": inspect(podman, name)["Id"]}

    client.xadd(stream, {"id": f"{name}-delete", "type": "delete", "instance": name, "user": "u"})
    ids.append(f"{name}-delete")
    wait_for(lambda: task_hash(client, "dock", ids[2]).get("status") in ("completed", "failed"), 30, "the delete task")
    assert task_hash(client, "dock", ids[2])["status"] == "completed", task_hash(client, "dock", ids[2])
    assert inspect(podman, name) is None

    def sql_statuses() -> dict[str, str]:
        store = open_store(sqlite_url)
        try:
            return {row["id"]: row["status"] for row in store.list_tasks(provider="dock", limit=10)}
        finally:
            store.close()

    wait_for(lambda: sql_statuses() == dict.fromkeys(ids, "completed"), 10, "three completed rows in SQL")
