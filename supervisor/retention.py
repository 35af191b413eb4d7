"""Deleting finished tasks older than a retention time, from Redis and from SQL.

`taskvisor purge` deletes them all at once. With `supervisor.retention` set, the
reconciliation pass (supervisor/reconcile.py) deletes them a bounded batch per pass.

In Redis, a task's hash, its history list and its `task-index` entry go. The
`task-index` hash is walked with HSCAN, because it names every task with its
provider. A Lua script deletes the hash and the history only while the task is still
in a final status and ended before the cutoff, so a task that `taskvisor retry` put
back in line meanwhile is kept. The index entry goes after the script, so a task id
is never free while its task exists. In SQL, rows of `taskvisor_tasks` go in batches;
instance rows stay, because they hold the instances' current status.
"""

import logging
import re
import threading
import time
from collections.abc import Iterator

import redis

from shared.errors import StoreError
from shared.keys import PROVIDER_ID_PATTERN, Keys
from shared.redis_client import text as _text
from shared.settings import Config
from shared.store import Store, open_store

log = logging.getLogger(__name__)

DURATION_PATTERN = re.compile(r"(\d+)([smhd])")
UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
DURATION_RULE = "expected a whole number followed by s, m, h or d, such as 90m or 30d"
# Fields asked of HSCAN per call, and rows deleted by one SQL statement.
SCAN_COUNT = 500
SQL_BATCH_ROWS = 500
# Per reconciliation pass: task-index entries looked at, and SQL delete statements run.
PASS_SCAN_LIMIT = 5000
PASS_SQL_BATCHES = 10

# KEYS: task hash, history list. ARGV: cutoff in epoch seconds.
# Returns 1 when the task was in a final status, ended before the cutoff and was deleted.
PURGE_SCRIPT = """
local FINAL = {completed = true, failed = true, timeout = true, cancelled = true}
local state = redis.call('HMGET', KEYS[1], 'status', 'completed_at', 'updated_at')
if not state[1] or not FINAL[state[1]] then
  return 0
end
local ended = tonumber(state[2]) or tonumber(state[3])
if not ended or ended >= tonumber(ARGV[1]) then
  return 0
end
redis.call('DEL', KEYS[1], KEYS[2])
return 1
"""


def parse_duration(text: str) -> int:
    """Return the seconds of a duration such as `30d`, raising ValueError that names the value."""
    match = DURATION_PATTERN.fullmatch(text.strip())
    if not match:
        raise ValueError(f"invalid duration {text!r}: {DURATION_RULE}")
    seconds = int(match.group(1)) * UNIT_SECONDS[match.group(2)]
    if seconds <= 0:
        raise ValueError(f"invalid duration {text!r}: it must be longer than 0")
    return seconds


class RedisPurger:
    """Finds and deletes finished tasks in Redis, a batch of task-index entries at a time."""

    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self.client = client
        self.keys = keys
        self.script = client.register_script(PURGE_SCRIPT)

    def task_count(self) -> int:
        return int(self.client.hlen(self.keys.task_index()))

    def scan(self, cursor: int, count: int = SCAN_COUNT) -> tuple[int, list[tuple[str, str]]]:
        """Return the next HSCAN cursor and (task id, provider) of the task-index entries read."""
        cursor, entries = self.client.hscan(self.keys.task_index(), cursor, count=count)
        tasks = []
        for task_id, owner in entries.items():
            provider = _text(owner).partition(" ")[0]
            if PROVIDER_ID_PATTERN.match(provider):
                tasks.append((_text(task_id), provider))
        return int(cursor), tasks

    def scan_all(self) -> Iterator[list[tuple[str, str]]]:
        """Yield batches of (task id, provider) until the whole task-index has been read."""
        cursor = 0
        while True:
            cursor, tasks = self.scan(cursor)
            yield tasks
            if cursor == 0:
                return

    def expired(self, tasks: list[tuple[str, str]], before: float) -> list[tuple[str, str]]:
        """Return the tasks that are in a final status and ended before `before`."""
        if not tasks:
            return []
        pipe = self.client.pipeline(transaction=False)
        for task_id, provider in tasks:
            pipe.hmget(self.keys.task(provider, task_id), "status", "completed_at", "updated_at")
        found = []
        for task, (status, completed_at, updated_at) in zip(tasks, pipe.execute(), strict=True):
            if _text(status) not in ("completed", "failed", "timeout", "cancelled"):
                continue
            try:
                ended = float(_text(completed_at) or _text(updated_at))
            except ValueError:
                continue
            if ended < before:
                found.append(task)
        return found

    def delete(self, tasks: list[tuple[str, str]], before: float) -> int:
        """Delete each task that is still final and expired; returns how many were deleted."""
        if not tasks:
            return 0
        try:
            replies = self._run_script(tasks, before)
        except redis.exceptions.NoScriptError:
            # A cluster pipeline does not load scripts; a node that restarted lacks them.
            self.client.script_load(PURGE_SCRIPT)
            replies = self._run_script(tasks, before)
        deleted = [task for task, reply in zip(tasks, replies, strict=True) if int(reply) == 1]
        if deleted:
            self.client.hdel(self.keys.task_index(), *[task_id for task_id, _provider in deleted])
        return len(deleted)

    def _run_script(self, tasks: list[tuple[str, str]], before: float) -> list:
        pipe = self.client.pipeline(transaction=False)
        for task_id, provider in tasks:
            keys = [self.keys.task(provider, task_id), self.keys.history(provider, task_id)]
            self.script(keys=keys, args=[f"{before:.6f}"], client=pipe)
        return pipe.execute()


def purge_sql_batches(store: Store, before: float, max_batches: int | None = None) -> Iterator[int]:
    """Delete finished tasks that ended before `before`, yielding the rows each batch deleted.

    Stops when a batch finds nothing more, or after `max_batches` batches. Raises StoreError.
    """
    batches = 0
    while max_batches is None or batches < max_batches:
        deleted = store.delete_finished_before(before, SQL_BATCH_ROWS)
        batches += 1
        if deleted == 0:
            return
        yield deleted


class SqlPurgeThread:
    """Deletes expired SQL rows in a thread of the intake, a bounded round per request.

    The intake must keep registering tasks and beating its heartbeat while the database
    is slow or down, so the SQL work never runs on its main thread.
    """

    def __init__(self, config: Config) -> None:
        self.config = config
        self.before = 0.0
        self.requested = threading.Event()
        self.thread: threading.Thread | None = None
        self.store: Store | None = None

    def request(self, before: float) -> None:
        """Ask for one round that deletes rows of tasks that ended before `before`."""
        self.before = before
        self.requested.set()
        if self.thread is None:
            self.thread = threading.Thread(target=self.run, name="sql-purge", daemon=True)
            self.thread.start()

    def run(self) -> None:
        while True:
            self.requested.wait()
            self.requested.clear()
            self.purge_round(self.before)

    def purge_round(self, before: float) -> int:
        deleted = 0
        try:
            if self.store is None:
                self.store = open_store(self.config.database.url, self.config.base_dir)
            for count in purge_sql_batches(self.store, before, PASS_SQL_BATCHES):
                deleted += count
        except StoreError as exc:
            log.warning("finished tasks not purged from sql; retrying at the next pass error=%s", exc)
            store, self.store = self.store, None
            if store is not None:
                store.close()
        if deleted:
            log.info("finished tasks purged from sql rows=%d ended_before=%.0f", deleted, before)
        return deleted


class RetentionPurge:
    """The retention step of the reconciliation pass: one bounded batch per call."""

    def __init__(self, config: Config, client: redis.Redis, keys: Keys) -> None:
        self.retention = config.supervisor.retention
        self.purger = RedisPurger(client, keys)
        self.sql = SqlPurgeThread(config)
        # HSCAN cursor into the task-index, kept between passes; 0 starts a new round.
        self.cursor = 0

    def run(self) -> int:
        """Delete expired tasks among the next task-index entries; returns how many left Redis."""
        before = time.time() - self.retention
        self.sql.request(before)
        tasks: list[tuple[str, str]] = []
        scanned = 0
        while scanned < PASS_SCAN_LIMIT:
            self.cursor, batch = self.purger.scan(self.cursor)
            tasks += batch
            scanned += max(len(batch), 1)
            if self.cursor == 0:
                break
        return self.purger.delete(self.purger.expired(tasks, before), before)
