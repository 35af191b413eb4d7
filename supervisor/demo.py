"""`taskvisor demo`: the whole system on one machine with no external services.

It starts a private redis-server with AOF under the data folder, writes a config for
the example providers that points at it and at a SQLite file beside it, starts the
supervisor, pushes a demo batch with plain XADD calls (the same protocol any panel
uses), and prints every state change until Ctrl-C.
"""

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
from shared.settings import load_config
from supervisor.embedded import EmbeddedRedis

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SUPERVISOR_STOP_SECONDS = 60


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
    """Return (provider, fields) pairs: a mix of types, one failure, one secret."""
    plan = [
        ("demo-pool", {"type": "create", "user": "alice", "data": '{"plan": "2c-4g", "image": "debian-12"}'}),
        ("demo-pool", {"type": "start", "instance": "vm-101", "user": "alice"}),
        ("demo-serial", {"type": "stop", "instance": "vm-201", "user": "bob"}),
        ("demo-pool", {"type": "restart", "instance": "vm-102", "user": "carol"}),
        ("demo-serial", {"type": "start", "instance": "vm-202", "user": "bob"}),
        ("demo-pool", {"type": "reset-password", "instance": "vm-103", "user": "alice",
                       "data": '{"username": "root", "password": "Demo-Secret-42"}'}),
        ("demo-serial", {"type": "restart", "instance": "vm-broken-7", "user": "dave"}),
        ("demo-pool", {"type": "reset", "instance": "vm-104", "user": "carol", "timeout": "60"}),
        ("demo-serial", {"type": "delete", "instance": "vm-203", "user": "bob"}),
        ("demo-pool", {"type": "stop", "instance": "vm-105", "user": "erin"}),
    ]  # fmt: skip
    return [plan[index % len(plan)] for index in range(count)]


def follow_events(client: redis.Redis, keys: Keys, providers: list[str], positions: dict[str, str]) -> None:
    reply = client.xread(positions, count=100, block=1000) or []
    for stream_name, items in reply:
        stream = stream_name.decode()
        for entry_id, raw in items:
            positions[stream] = entry_id.decode()
            fields = {name.decode(): value.decode() for name, value in raw.items()}
            status = fields.get("status", "")
            colour = {"completed": "green", "failed": "red", "timeout": "red", "running": "cyan"}.get(status)
            detail = fields.get("error") or fields.get("message") or ""
            line = (
                f"{time.strftime('%H:%M:%S')} {fields.get('provider', ''):12} {fields.get('id', ''):28} "
                f"{fields.get('type', ''):14} {fields.get('instance') or '-':12} "
            )
            click.echo(line + click.style(f"{status:10}", fg=colour) + f" {float(fields.get('progress') or 0):3.0f}%  {detail[:70]}")


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
        providers = list(config.providers)
        positions = {keys.events(provider): "$" for provider in providers}
        for stream in positions:
            last = client.xrevrange(stream, count=1)
            positions[stream] = last[0][0].decode() if last else "0-0"

        log_path = data / "supervisor.log"
        with open(log_path, "ab") as log_file:
            supervisor = subprocess.Popen(
                [sys.executable, "-m", "supervisor", "supervise", "--config", str(config_path)],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        _print_intro(config_path, embedded, data)
        for provider, fields in demo_batch(task_count):
            client.xadd(keys.tasks(provider), fields)

        signal.signal(signal.SIGTERM, _raise_interrupt)
        while supervisor.poll() is None:
            follow_events(client, keys, providers, positions)
        click.echo(f"the supervisor exited with code {supervisor.returncode}; see {log_path}", err=True)
        return supervisor.returncode or 1
    except KeyboardInterrupt:
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


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


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
