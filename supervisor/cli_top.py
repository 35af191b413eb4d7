"""`taskvisor top`: a live view of the providers and the running tasks, read from Redis.

Each frame reads the running supervisors' status keys (target and running workers),
each provider's task stream length and busy hash, and the status hash of every
running task. Throughput counts the events with a final status in each provider's
event stream over the last 60 seconds: the first frame reads that minute with XRANGE,
later frames only the events added since. All times come from the Redis server's
clock, which also stamps the events and the busy hashes.
"""

import re
import shutil
import sys
import time
from collections import deque

import click
import redis

from shared.keys import Keys
from shared.redaction import redact_url
from shared.redis_client import text
from shared.settings import Config
from supervisor.cli_common import connection_options, fail, open_redis
from supervisor.status import read_statuses

THROUGHPUT_WINDOW_MS = 60_000
# Events read with one XRANGE call; a frame reads until it has caught up.
RANGE_COUNT = 1000
FINAL_STATUSES = (b"completed", b"failed", b"timeout", b"cancelled")
# C0 and C1 control characters, so that a task message cannot move the cursor or change colours.
CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# Terminal control sequences: cursor home, clear to the end of the line, clear the rest of
# the screen, hide and show the cursor.
HOME, CLEAR_LINE, CLEAR_BELOW = "\x1b[H", "\x1b[K", "\x1b[J"
HIDE_CURSOR, SHOW_CURSOR = "\x1b[?25l", "\x1b[?25h"


def _text(value: bytes | str | None) -> str:
    return CONTROL_CHARACTERS.sub(" ", text(value))


class Throughput:
    """Final-status events per provider in the last minute, from the event streams."""

    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self.client = client
        self.keys = keys
        # Provider -> id of the last event read, and the millisecond times of final events.
        self.positions: dict[str, str] = {}
        self.ended: dict[str, deque[int]] = {}

    def per_minute(self, providers: list[str], now_ms: int) -> dict[str, int]:
        counts = {}
        for provider in providers:
            ended = self.ended.setdefault(provider, deque())
            self._read_new(provider, ended, now_ms)
            while ended and ended[0] <= now_ms - THROUGHPUT_WINDOW_MS:
                ended.popleft()
            counts[provider] = len(ended)
        return counts

    def _read_new(self, provider: str, ended: deque[int], now_ms: int) -> None:
        stream = self.keys.events(provider)
        start = self.positions.get(provider)
        start = f"({start}" if start else str(now_ms - THROUGHPUT_WINDOW_MS)
        while True:
            entries = self.client.xrange(stream, min=start, max="+", count=RANGE_COUNT)
            for entry_id, fields in entries:
                position = _text(entry_id)
                self.positions[provider] = position
                if fields.get(b"status") in FINAL_STATUSES:
                    ended.append(int(position.partition("-")[0]))
            if len(entries) < RANGE_COUNT:
                return
            start = f"({self.positions[provider]}"


def read_snapshot(client: redis.Redis, keys: Keys, config: Config, throughput: Throughput) -> dict:
    """Read one frame's data from Redis. Raises RedisError."""
    seconds, micros = client.time()
    now = seconds + micros / 1e6
    statuses = read_statuses(client, keys)
    groups: dict[str, dict] = {}
    for status in statuses:
        for provider, group in status.get("providers", {}).items():
            total = groups.setdefault(provider, {"target": 0, "workers": 0, "retiring": 0})
            for name in total:
                total[name] += int(group.get(name, 0))
    providers = sorted(set(config.providers) | set(groups))

    pipe = client.pipeline(transaction=False)
    for provider in providers:
        pipe.xlen(keys.tasks(provider))
        pipe.hgetall(keys.busy(provider))
    replies = pipe.execute()

    running = []
    rows = []
    per_minute = throughput.per_minute(providers, int(now * 1000))
    for index, provider in enumerate(providers):
        stream_length, busy = replies[2 * index], replies[2 * index + 1]
        group = groups.get(provider, {"target": 0, "workers": 0, "retiring": 0})
        rows.append({"provider": provider, **group, "busy": len(busy), "queued": max(stream_length - len(busy), 0),
                     "per_minute": per_minute[provider]})  # fmt: skip
        for value in busy.values():
            task_id, _, started = _text(value).rpartition(" ")
            try:
                started_at = float(started)
            except ValueError:
                continue
            running.append({"provider": provider, "id": task_id, "started_at": started_at})
    _add_task_fields(client, keys, running)
    running.sort(key=lambda task: (task["provider"], task["started_at"], task["id"]))
    return {"now": now, "supervisors": len(statuses), "providers": rows, "running": running}


def _add_task_fields(client: redis.Redis, keys: Keys, running: list[dict]) -> None:
    pipe = client.pipeline(transaction=False)
    for task in running:
        pipe.hmget(keys.task(task["provider"], task["id"]), "type", "instance", "progress", "message")
    for task, values in zip(running, pipe.execute() if running else [], strict=True):
        task_type, instance, progress, message = (_text(value) for value in values)
        task.update(type=task_type, instance=instance, progress=progress, message=message)


def render(snapshot: dict, redis_url: str, width: int | None = None, height: int | None = None) -> list[str]:
    """Return the lines of one frame, cut to `width` columns and `height` lines when given."""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(snapshot["now"]))
    lines = [f"taskvisor top  {redact_url(redis_url)}  {stamp}  supervisors: {snapshot['supervisors']}", ""]
    providers = snapshot["providers"]
    width_provider = max([len("PROVIDER"), *(len(row["provider"]) for row in providers)])
    lines.append(f"{'PROVIDER':{width_provider}} {'TARGET':>6} {'WORKERS':>7} {'BUSY':>5} {'QUEUED':>7} {'ENDED/MIN':>9}")
    for row in providers:
        workers = f"{row['workers']}+{row['retiring']}" if row["retiring"] else str(row["workers"])
        lines.append(
            f"{row['provider']:{width_provider}} {row['target']:>6} {workers:>7} {row['busy']:>5} {row['queued']:>7} "
            f"{row['per_minute']:>9}"
        )
    if not providers:
        lines.append("no providers: no supervisor runs on this Redis and prefix, and the config lists none")

    lines += ["", f"RUNNING TASKS ({len(snapshot['running'])})"]
    running = snapshot["running"]
    width_id = max([len("TASK"), *(len(task["id"]) for task in running)])
    lines.append(f"{'TASK':{width_id}} {'PROVIDER':{width_provider}} {'TYPE':<14} {'INSTANCE':<16} {'PROGRESS':>8} "
                 f"{'ELAPSED':>9}  MESSAGE")  # fmt: skip
    visible_tasks = running if height is None else running[: max(height - len(lines) - 1, 0)]
    for task in visible_tasks:
        progress = f"{float(task['progress'] or 0):.0f} %"
        elapsed = _format_elapsed(snapshot["now"] - task["started_at"])
        lines.append(
            f"{task['id']:{width_id}} {task['provider']:{width_provider}} {task['type']:<14} {task['instance'] or '-':<16} "
            f"{progress:>8} {elapsed:>9}  {task['message']}"
        )
    if len(visible_tasks) < len(running):
        lines.append(f"... and {len(running) - len(visible_tasks)} more")
    if width is not None:
        lines = [line[:width] for line in lines]
    return lines


def _format_elapsed(seconds: float) -> str:
    seconds = max(seconds, 0.0)
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{rest:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


@click.command()
@connection_options(uses_database=False)
@click.option("--interval", default=1.0, show_default=True, type=click.FloatRange(0.2, 60),
              help="Seconds between two frames.")
@click.option("--once", is_flag=True, help="Print one frame without terminal control sequences and exit.")
def top(config: Config, interval: float, once: bool) -> None:
    """Show providers and running tasks, refreshed every second, until Ctrl-C.

    Per provider: target and running workers, busy workers, queued entries and tasks
    that ended in the last minute. Per running task: id, provider, type, instance,
    progress, time since it started and its last message.
    """
    keys = Keys(config.redis.prefix)
    try:
        client = open_redis(config)
        throughput = Throughput(client, keys)
        if once:
            snapshot = read_snapshot(client, keys, config, throughput)
            click.echo("\n".join(render(snapshot, config.redis.url)))
            return
    except redis.RedisError as exc:
        fail(f"Redis at {redact_url(config.redis.url)} failed: {exc}")
    _run_live(client, keys, config, throughput, interval)


def _run_live(client: redis.Redis, keys: Keys, config: Config, throughput: Throughput, interval: float) -> None:
    """Redraw a frame every `interval` seconds until Ctrl-C, which exits with code 0."""
    terminal = sys.stdout.isatty()
    out = sys.stdout
    try:
        if terminal:
            out.write(HIDE_CURSOR)
        while True:
            size = shutil.get_terminal_size()
            try:
                snapshot = read_snapshot(client, keys, config, throughput)
                lines = render(snapshot, config.redis.url, size.columns if terminal else None,
                               size.lines - 1 if terminal else None)  # fmt: skip
            except redis.RedisError as exc:
                stamp = time.strftime("%H:%M:%S")
                lines = [f"taskvisor top  {stamp}  Redis at {redact_url(config.redis.url)} failed: {exc}; retrying"]
            if terminal:
                out.write(HOME + "".join(line + CLEAR_LINE + "\n" for line in lines) + CLEAR_BELOW)
            else:
                out.write("\n".join(lines) + "\n\n")
            out.flush()
            time.sleep(interval)
    except KeyboardInterrupt:
        pass
    finally:
        if terminal:
            out.write(SHOW_CURSOR)
        out.flush()
        client.close()
