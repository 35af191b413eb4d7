"""`taskvisor demo`: the whole system on one machine with no external services.

It starts a private redis-server with AOF under the data folder and writes a config
for the example providers that points at it and at a SQLite file beside it. Then it
starts the supervisor and pushes a demo batch with plain XADD calls (the same protocol
any panel uses). It prints every state change and every rejected entry. After Ctrl-C
it keeps printing until the supervisor has exited, then prints how many tasks ended
in each status.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import click
import redis
import yaml

from shared.errors import TaskvisorError
from shared.keys import Keys
from shared.provider_settings import settings_key
from shared.settings import Config, load_config
from shared.states import TaskStatus
from supervisor.embedded import EmbeddedRedis

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
# Seconds the supervisor may take beyond its shutdown grace before the demo kills it.
SUPERVISOR_STOP_SECONDS = 60
# How long one XREAD waits for new entries. It bounds the delay before a Ctrl-C is forwarded.
READ_BLOCK_MS = 250
STATUS_COLOURS = {"completed": "green", "failed": "red", "timeout": "red", "running": "cyan", "pending": "yellow"}


def write_demo_config(data_dir: Path, redis_url: str) -> Path:
    source = EXAMPLES / "demo.yaml"
    if not source.is_file():
        raise TaskvisorError(f"{source} not found: run the demo from a taskvisor checkout (pip install -e .)")
    document = yaml.safe_load(source.read_text(encoding="utf-8"))
    document["redis"] = {"url": redis_url}
    document["database"] = {"url": f"sqlite:///{(data_dir / 'taskvisor.db').resolve()}"}
    for provider in document["providers"].values():
        workdir = provider["driver"].get("workdir")
        if workdir:
            provider["driver"]["workdir"] = str((EXAMPLES / workdir).resolve())
    path = data_dir / "taskvisor.yaml"
    path.write_text("# Written by `taskvisor demo`.\n" + yaml.safe_dump(document, sort_keys=False), encoding="utf-8")
    load_config(path)
    return path


def demo_batch(count: int) -> list[tuple[str, dict[str, str]]]:
    """Return (provider, fields) pairs: a mix of types, one failure, one secret and one invalid entry."""
    plan = [
        ("demo-pool", {"type": "create", "user": "alice", "data": '{"plan": "2c-4g", "image": "debian-12"}'}),
        ("demo-pool", {"type": "start", "instance": "vm-101", "user": "alice"}),
        ("demo-serial", {"type": "stop", "instance": "vm-201", "user": "bob"}),
        ("demo-pool", {"type": "restart", "instance": "vm-102", "user": "carol"}),
        ("demo-serial", {"type": "start", "instance": "vm-202", "user": "bob"}),
        ("demo-pool", {"type": "reset-password", "instance": "vm-103", "user": "alice",
                       "data": '{"username": "root", "password": "Demo-Secret-42"}'}),
        ("demo-serial", {"type": "restart", "instance": "vm-broken-7", "user": "dave"}),
        # Not a task type: a worker moves this entry to the dead-letter stream.
        ("demo-pool", {"type": "reboot", "instance": "vm-106", "user": "erin"}),
        ("demo-pool", {"type": "reset", "instance": "vm-104", "user": "carol", "timeout": "60"}),
        ("demo-serial", {"type": "delete", "instance": "vm-203", "user": "bob"}),
        ("demo-pool", {"type": "stop", "instance": "vm-105", "user": "erin"}),
    ]  # fmt: skip
    return [plan[index % len(plan)] for index in range(count)]


class StreamPrinter:
    """Printer for the event and dead-letter streams of the demo providers.

    It prints each entry and records the last status seen for each task, for the summary at the end.
    """

    def __init__(self, client: redis.Redis, keys: Keys, providers: list[str]) -> None:
        self.client = client
        self.event_streams = {keys.events(provider): provider for provider in providers}
        self.dead_streams = {keys.dead(provider): provider for provider in providers}
        self.positions: dict[str, str] = {}
        for stream in [*self.event_streams, *self.dead_streams]:
            last = client.xrevrange(stream, count=1)
            self.positions[stream] = last[0][0].decode() if last else "0-0"
        self.statuses: dict[str, str] = {}
        self.rejected = 0

    def follow(self, block_ms: int | None = READ_BLOCK_MS) -> int:
        """Print the entries added since the last call and return how many there were.

        With `block_ms`, wait up to that long for a first entry. None returns at once.
        """
        reply = self.client.xread(self.positions, count=100, block=block_ms) or []
        printed = 0
        for stream_name, items in reply:
            stream = stream_name.decode()
            for entry_id, raw in items:
                self.positions[stream] = entry_id.decode()
                fields = {name.decode(): value.decode() for name, value in raw.items()}
                if stream in self.dead_streams:
                    self.print_rejected(self.dead_streams[stream], fields)
                else:
                    self.print_event(fields)
                printed += 1
        return printed

    def drain(self) -> None:
        """Print every entry that is left, without waiting for new ones."""
        while self.follow(block_ms=None):
            pass

    def print_event(self, fields: dict[str, str]) -> None:
        if fields.get("error", "").startswith("rejected: "):
            # The task of a rejected entry: its line comes from the dead-letter stream.
            return
        status = fields.get("status", "")
        if fields.get("id"):
            self.statuses[fields["id"]] = status
        detail = fields.get("error") or fields.get("message") or ""
        line = (
            f"{time.strftime('%H:%M:%S')} {fields.get('provider', ''):12} {fields.get('id', ''):28} "
            f"{fields.get('type', ''):14} {fields.get('instance') or '-':12} "
        )
        progress = f" {float(fields.get('progress') or 0):3.0f}%  {detail[:120]}"
        click.echo(line + click.style(f"{status:10}", fg=STATUS_COLOURS.get(status)) + progress)

    def print_rejected(self, provider: str, fields: dict[str, str]) -> None:
        self.rejected += 1
        try:
            entry_fields = json.loads(fields.get("fields") or "{}")
        except ValueError:
            entry_fields = {}
        if not isinstance(entry_fields, dict):
            entry_fields = {}
        # The line shows the entry's own `id` field, or its entry id when it had none.
        label = str(entry_fields.get("id") or f"entry {fields.get('entry', '')}")
        line = (
            f"{time.strftime('%H:%M:%S')} {provider:12} {label:28} "
            f"{entry_fields.get('type', '')!s:14} {entry_fields.get('instance') or '-'!s:12} "
        )
        click.echo(line + click.style(f"{'rejected':10}", fg="magenta") + f"       {fields.get('reason', '')}")

    def summary(self) -> str:
        counts: dict[str, int] = {}
        for status in self.statuses.values():
            counts[status] = counts.get(status, 0) + 1
        order = [str(status) for status in TaskStatus]
        ordered = sorted(counts, key=lambda status: order.index(status) if status in order else len(order))
        by_status = ", ".join(f"{status} {counts[status]}" for status in ordered) or "none"
        return f"tasks seen by the demo, by status at exit: {by_status}. Rejected entries: {self.rejected}"


class StopRequests:
    """Counter of SIGINT (Ctrl-C) and SIGTERM, so that the main loop can forward each one to the supervisor."""

    def __init__(self) -> None:
        self.count = 0

    def install(self) -> None:
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self.record)

    def record(self, signum: int, frame: object) -> None:
        self.count += 1


def run_demo(data_dir: str, port: int, task_count: int) -> int:
    data = Path(data_dir).resolve()
    embedded = EmbeddedRedis(data, port)
    embedded.start()
    supervisor: subprocess.Popen | None = None
    try:
        config_path = write_demo_config(data, embedded.url)
        config = load_config(config_path)
        keys = Keys(config.redis.prefix)
        client = redis.Redis.from_url(embedded.url)
        printer = StreamPrinter(client, keys, list(config.providers))

        log_path = data / "supervisor.log"
        with open(log_path, "ab") as log_file:
            # In its own session, so that Ctrl-C in the terminal reaches only the demo,
            # which forwards it.
            supervisor = subprocess.Popen(
                [sys.executable, "-m", "supervisor", "supervise", "--config", str(config_path)],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        stop_requests = StopRequests()
        stop_requests.install()
        _print_intro(config_path, embedded, data)
        _print_settings_overrides(client, keys, list(config.providers))
        for provider, fields in demo_batch(task_count):
            client.xadd(keys.tasks(provider), fields)
        return _follow_until_exit(supervisor, printer, stop_requests, config, log_path)
    except KeyboardInterrupt:
        # Ctrl-C while the demo was still starting, before StopRequests took over SIGINT.
        click.echo("\nstopping: running tasks get their grace period, then Redis stops", err=True)
        return 0
    finally:
        if supervisor is not None and supervisor.poll() is None:
            supervisor.send_signal(signal.SIGINT)
            try:
                supervisor.wait(SUPERVISOR_STOP_SECONDS)
            except subprocess.TimeoutExpired:
                supervisor.kill()
                supervisor.wait()
        embedded.stop()


def _follow_until_exit(
    supervisor: subprocess.Popen, printer: StreamPrinter, stop_requests: StopRequests, config: Config, log_path: Path
) -> int:
    """Print stream entries until the supervisor exits, forwarding each stop request to it.

    Returns the demo's exit code: 0 after a requested stop that the supervisor completed,
    otherwise the supervisor's exit code, or 1 if it was 0 or the supervisor was killed.
    """
    forwarded = 0
    kill_at: float | None = None
    grace = config.supervisor.shutdown_grace
    while supervisor.poll() is None:
        while forwarded < stop_requests.count:
            supervisor.send_signal(signal.SIGINT)
            forwarded += 1
            if forwarded == 1:
                kill_at = time.monotonic() + grace + SUPERVISOR_STOP_SECONDS
                click.echo(
                    f"\nstopping: running tasks get {grace:g} seconds to finish, then go back to pending. "
                    f"Press Ctrl-C again to stop them now.",
                    err=True,
                )
            elif forwarded == 2:
                click.echo("\nstopping running tasks now: they go back to pending", err=True)
        if kill_at is not None and time.monotonic() > kill_at:
            click.echo(
                f"the supervisor did not stop within {grace + SUPERVISOR_STOP_SECONDS:g} seconds, so the demo kills it. "
                f"See {log_path}",
                err=True,
            )
            supervisor.kill()
            supervisor.wait()
            break
        try:
            printer.follow()
        except BrokenPipeError:
            # The terminal or pipe reading the demo is gone: stop printing, keep supervising.
            sys.stdout = open(os.devnull, "w")

    try:
        printer.drain()
        click.echo(printer.summary())
    except BrokenPipeError:
        sys.stdout = open(os.devnull, "w")
    if forwarded and supervisor.returncode == 0:
        click.echo("the supervisor stopped, so Redis stops now", err=True)
        return 0
    click.echo(f"the supervisor exited with code {supervisor.returncode}; see {log_path}", err=True)
    return supervisor.returncode if supervisor.returncode > 0 else 1


def _print_settings_overrides(client: redis.Redis, keys: Keys, providers: list[str]) -> None:
    """Say which provider settings an earlier run changed through Redis, because they still apply."""
    for provider in providers:
        fields = client.hgetall(settings_key(keys, provider))
        if fields:
            shown = " ".join(f"{name.decode()}={value.decode()}" for name, value in sorted(fields.items()))
            names = " ".join(name.decode() for name in sorted(fields))
            click.echo(
                f"note: {provider} keeps settings changed earlier through Redis: {shown}; "
                f"`taskvisor provider unset {provider} {names}` returns to examples/demo.yaml",
                err=True,
            )


def _print_intro(config_path: Path, embedded: EmbeddedRedis, data: Path) -> None:
    redis_cli = shutil.which("redis-cli") and "redis-cli"
    if not redis_cli:
        redis_cli = str(Path(embedded.binary).with_name("redis-cli"))
    click.echo(
        f"""
taskvisor demo
  redis     {embedded.url} (append-only file in {data})
  database  {data / 'taskvisor.db'}
  config    {config_path}
  log       {data / 'supervisor.log'}

From a second terminal, in this folder:
  export TASKVISOR_CONFIG={config_path}
  .venv/bin/taskvisor submit --provider demo-pool --type start --instance vm-9 --user alice
  {redis_cli} -p {embedded.port} XADD 'taskvisor:{{demo-serial}}:tasks' '*' type stop instance vm-9 user alice
  .venv/bin/taskvisor list
Press Ctrl-C to stop.
""",
        err=True,
    )
