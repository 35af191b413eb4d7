"""The systems under test: how to start each one's workers at a given total concurrency, and stop them.

Every system runs the same no-op task from bench/apps against the same private Redis.
Workers are started in their own session, so that `stop()` can end the whole process
group that this harness started, and nothing else.
"""

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

import redis

from harness.environment import BENCH_DIR, REPO_DIR, venv_python
from harness.mariadb_server import PrivateMariadb
from harness.mirror_lag import MariadbCounter, RowCounter, SqliteCounter
from harness.stats import nearest_rank

APPS_DIR = os.path.join(BENCH_DIR, "apps")
# Seconds a system gets to exit after SIGTERM before its process group gets SIGKILL.
STOP_TIMEOUT_SECONDS = 15.0

TASKVISOR_PREFIX = "tvbench"
TASKVISOR_PROVIDER = "noop"
TASKVISOR_STREAM = f"{TASKVISOR_PREFIX}:{{{TASKVISOR_PROVIDER}}}:tasks"
# The database of the taskvisor-mariadb row on the private MariaDB, made anew before each run.
MARIADB_DATABASE = "tvbench"
DEFAULT_CONCURRENCY = 2


@dataclass
class RunContext:
    redis_url: str
    scratch: str
    # The folder whose supervisor/, worker/ and shared/ packages are measured.
    taskvisor_dir: str = REPO_DIR
    mode: str = "throughput"
    label: str = ""
    # Tasks that the system runs at once, over all its processes.
    concurrency: int = DEFAULT_CONCURRENCY
    # The private MariaDB of the taskvisor-mariadb row; None when the run does not need it.
    mariadb: PrivateMariadb | None = None

    @property
    def pid_dir(self) -> str:
        """The folder where the cancel measurement's tasks record their pids (bench_common.record_pid)."""
        return os.path.join(self.scratch, "pids")

    def environment(self, with_taskvisor: bool) -> dict[str, str]:
        env = dict(os.environ)
        paths = [APPS_DIR, self.taskvisor_dir] if with_taskvisor else [APPS_DIR]
        env["PYTHONPATH"] = os.pathsep.join(paths)
        env["BENCH_REDIS_URL"] = self.redis_url
        env["BENCH_MODE"] = self.mode
        env["BENCH_TV_STREAM"] = TASKVISOR_STREAM
        env["BENCH_TV_PREFIX"] = TASKVISOR_PREFIX
        env["BENCH_TV_PROVIDER"] = TASKVISOR_PROVIDER
        env["BENCH_PID_DIR"] = self.pid_dir
        env["BENCH_CONCURRENCY"] = str(self.concurrency)
        env.pop("VIRTUAL_ENV", None)
        return env


@dataclass
class RunningSystem:
    processes: list[subprocess.Popen]
    # Relative to the repository root, as it appears in the reports.
    log_path: str
    clean_stop: bool = True
    log_handle: object = None

    def exited(self) -> bool:
        return any(process.poll() is not None for process in self.processes)

    def stop(self) -> None:
        """Send SIGTERM to every started process, wait, then SIGKILL what is left of their groups."""
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_SECONDS
        for process in self.processes:
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.clean_stop = False
                process.kill()
                process.wait()
        for process in self.processes:
            # Pool children that outlived their parent are still in the group the harness made.
            try:
                os.killpg(process.pid, signal.SIGKILL)
                self.clean_stop = False
            except ProcessLookupError:
                pass
        if self.log_handle is not None:
            self.log_handle.close()


@dataclass
class System:
    """One row of the benchmark: `client` names the sender in bench/apps/produce.py.

    `description` may contain `{concurrency}`, which `describe()` fills in.
    """

    name: str
    client: str
    environment: str
    description: str
    uses_taskvisor: bool = False

    def describe(self, concurrency: int) -> str:
        return self.description.format(concurrency=concurrency)

    @property
    def python(self) -> str:
        return sys.executable if self.environment == "taskvisor" else venv_python(self.environment)

    def tool(self, name: str) -> str:
        return os.path.join(os.path.dirname(self.python), name)

    def prepare(self, context: RunContext) -> None:
        """Write the files that the workers need before they start. The default writes none."""

    def commands(self, context: RunContext) -> list[list[str]]:
        raise NotImplementedError

    def start(self, context: RunContext) -> RunningSystem:
        log_path = os.path.join(context.scratch, "logs", f"{self.name}-{context.label}.log")
        os.makedirs(os.path.dirname(log_path), exist_ok=True)
        # Stays open while the workers write to it; RunningSystem.stop() closes it.
        log_handle = open(log_path, "ab")  # noqa: SIM115
        env = context.environment(self.uses_taskvisor)
        processes = [
            subprocess.Popen(command, cwd=APPS_DIR, env=env, stdin=subprocess.DEVNULL, stdout=log_handle,
                             stderr=subprocess.STDOUT, start_new_session=True)
            for command in self.commands(context)
        ]  # fmt: skip
        return RunningSystem(processes, os.path.relpath(log_path, REPO_DIR), log_handle=log_handle)

    def all_recorded(self, context: RunContext, count: int) -> bool:
        """Return True when the system's own records show all `count` tasks done (beyond the Redis counter)."""
        return True

    def mirror_counter(self, context: RunContext) -> RowCounter | None:
        """Return a counter of the completed rows in the system's SQL table, or None for a system without one."""
        return None

    def latency_stages(self, client: redis.Redis, sent: dict[str, float], started: dict[str, float]) -> dict:
        """Return the median milliseconds of each stage between send and task start, where the system records them."""
        return {}


class Taskvisor(System):
    """taskvisor with its SQL mirror in a SQLite file under the run's scratch folder."""

    def config_path(self, context: RunContext) -> str:
        return os.path.join(context.scratch, self.name, "taskvisor.yaml")

    def database_path(self, context: RunContext) -> str:
        return os.path.join(context.scratch, self.name, "taskvisor.db")

    def database_url(self, context: RunContext) -> str:
        return f"sqlite:///{self.database_path(context)}"

    def reset_database(self, context: RunContext) -> None:
        """Remove the SQLite file and its WAL files, so that the run starts with an empty table."""
        database = self.database_path(context)
        for suffix in ("", "-wal", "-shm"):
            if os.path.exists(database + suffix):
                os.remove(database + suffix)

    def mirror_counter(self, context: RunContext) -> SqliteCounter:
        return SqliteCounter(self.database_path(context))

    def prepare(self, context: RunContext) -> None:
        if context.mode == "cancel":
            # The 30-second command of the cancel measurement, with the health endpoint on a free port.
            self.write_config(context, f"""\
  {TASKVISOR_PROVIDER}:
    allowConcurrentTasks: true
    maxConcurrentTasks: 2
    driver:
      type: command
      commands: {{start: ["/bin/sh", "{os.path.join(APPS_DIR, 'sleep_task.sh')}"]}}
""", extra="health: {port: 0}\n")  # fmt: skip
            return
        record_start = "true" if context.mode == "latency" else "false"
        self.write_config(context, f"""\
  {TASKVISOR_PROVIDER}:
    allowConcurrentTasks: true
    maxConcurrentTasks: {context.concurrency}
    driver:
      type: "noop_driver:NoopDriver"
      options: {{redisUrl: "{context.redis_url}", recordStart: {record_start}}}
""")  # fmt: skip

    def write_config(self, context: RunContext, providers: str, extra: str = "") -> None:
        """Write the config file with `providers` as the body of its `providers:` mapping, and empty the database.

        `extra` is YAML text added before `providers:`, such as a `health` section.
        """
        os.makedirs(os.path.dirname(self.config_path(context)), exist_ok=True)
        self.reset_database(context)
        config = f"""\
redis: {{url: "{context.redis_url}", prefix: {TASKVISOR_PREFIX}}}
database: {{url: "{self.database_url(context)}"}}
supervisor: {{name: bench, shutdownGrace: 5}}
{extra}providers:
{providers}"""
        with open(self.config_path(context), "w", encoding="utf-8") as handle:
            handle.write(config)

    def commands(self, context: RunContext) -> list[list[str]]:
        return [[self.python, "-m", "supervisor", "supervise", "--config", self.config_path(context)]]

    def all_recorded(self, context: RunContext, count: int) -> bool:
        """Return True when the SQL mirror contains `count` tasks in state completed."""
        counter = self.mirror_counter(context)
        try:
            completed = counter.completed()
        finally:
            counter.close()
        return completed is not None and completed >= count

    def latency_stages(self, client: redis.Redis, sent: dict[str, float], started: dict[str, float]) -> dict:
        """Split each task's latency at `started_at`, the Redis time at which start.lua made it running."""
        numbers = [number for number in sent if number in started]
        pipe = client.pipeline(transaction=False)
        for number in numbers:
            pipe.hget(f"{TASKVISOR_PREFIX}:{{{TASKVISOR_PROVIDER}}}:task:t-{number}", "started_at")
        to_running, to_driver = [], []
        for number, value in zip(numbers, pipe.execute(), strict=True):
            if value:
                running_at = float(value)
                to_running.append((running_at - sent[number]) * 1000)
                to_driver.append((started[number] - running_at) * 1000)
        if not to_running:
            return {}
        to_running.sort()
        to_driver.sort()
        return {
            "send_to_running_p50_ms": round(nearest_rank(to_running, 0.50), 3),
            "send_to_running_p99_ms": round(nearest_rank(to_running, 0.99), 3),
            "running_to_driver_p50_ms": round(nearest_rank(to_driver, 0.50), 3),
            "running_to_driver_p99_ms": round(nearest_rank(to_driver, 0.99), 3),
        }


class TaskvisorMariadb(Taskvisor):
    """taskvisor with its SQL mirror in a database of the run's private MariaDB."""

    def server(self, context: RunContext) -> PrivateMariadb:
        if context.mariadb is None:
            raise RuntimeError(f"the {self.name} row needs the private MariaDB, which bench/run.py starts when"
                               " a throughput run includes this row")  # fmt: skip
        return context.mariadb

    def database_url(self, context: RunContext) -> str:
        return self.server(context).url(MARIADB_DATABASE)

    def reset_database(self, context: RunContext) -> None:
        self.server(context).recreate_database(MARIADB_DATABASE)

    def mirror_counter(self, context: RunContext) -> MariadbCounter:
        server = self.server(context)
        return MariadbCounter(lambda timeout: server.connect(MARIADB_DATABASE, timeout))


def dramatiq_shape(concurrency: int) -> tuple[int, int]:
    """Return Dramatiq's processes and threads per process for a total concurrency: 2 processes when it is even."""
    processes = 2 if concurrency % 2 == 0 else 1
    return processes, concurrency // processes


class Celery(System):
    def commands(self, context: RunContext) -> list[list[str]]:
        # Gossip, mingle and heartbeat exchange messages with other worker nodes. The
        # benchmark runs a single node, so they are off.
        return [[self.tool("celery"), "-A", "celery_app", "worker", "--pool", "prefork", "--concurrency", str(context.concurrency),
                 "--without-gossip", "--without-mingle", "--without-heartbeat"]]  # fmt: skip


class Rq(System):
    worker_class = "rq.worker.SimpleWorker"

    def commands(self, context: RunContext) -> list[list[str]]:
        return [
            [self.tool("rq"), "worker", "--url", context.redis_url, "--worker-class", self.worker_class,
             "--path", APPS_DIR, "--name", f"bench-{slot}-{context.label}", "bench"]
            for slot in range(context.concurrency)
        ]  # fmt: skip


class RqForking(Rq):
    worker_class = "rq.worker.Worker"


class Arq(System):
    def commands(self, context: RunContext) -> list[list[str]]:
        # Job.abort() needs allow_abort_jobs, which adds a Redis round trip to every
        # poll, so only the cancel measurement turns it on.
        settings = "CancelWorkerSettings" if context.mode == "cancel" else "WorkerSettings"
        return [[self.tool("arq"), f"arq_worker.{settings}"]]


class Dramatiq(System):
    def describe(self, concurrency: int) -> str:
        processes, threads = dramatiq_shape(concurrency)
        return self.description.format(processes=processes, threads=threads, s="" if threads == 1 else "s")

    def commands(self, context: RunContext) -> list[list[str]]:
        processes, threads = dramatiq_shape(context.concurrency)
        return [[self.tool("dramatiq"), "dramatiq_actors", "--processes", str(processes), "--threads", str(threads),
                 "--path", APPS_DIR]]  # fmt: skip


SYSTEMS: dict[str, System] = {
    system.name: system
    for system in [
        Taskvisor("taskvisor", "taskvisor", "taskvisor",
                  "supervisor, 1 provider, maxConcurrentTasks {concurrency}, Python no-op driver, SQLite mirror",
                  uses_taskvisor=True),
        TaskvisorMariadb("taskvisor-mariadb", "taskvisor", "taskvisor",
                         "as taskvisor, but the mirror writes to a private MariaDB server (mariadbd --no-defaults,"
                         " built-in settings) over TCP on 127.0.0.1", uses_taskvisor=True),
        Celery("celery", "celery", "peers", "prefork pool, concurrency {concurrency}, acks_late, no result backend"),
        Rq("rq-simple", "rq", "peers", "{concurrency} SimpleWorker processes (no fork per job), result_ttl 0"),
        RqForking("rq-fork", "rq", "peers", "{concurrency} Worker processes (one fork per job), result_ttl 0"),
        Arq("arq", "arq", "arq", "1 worker, max_jobs {concurrency}, poll_delay 0.002 s (default 0.5 s), keep_result 0"),
        Dramatiq("dramatiq", "dramatiq", "peers", "Redis broker, {processes} processes x {threads} thread{s}"),
    ]
}  # fmt: skip
