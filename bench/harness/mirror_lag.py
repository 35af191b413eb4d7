"""How far taskvisor's SQL mirror trails the tasks while a backlog drains.

A sampler thread in the harness reads, every SAMPLE_SECONDS, how many rows of the SQL
table are in state `completed`, and then the done counter `bench:done`, which the no-op
driver increments before the worker marks the task completed. The harness's own 5 ms
reads of the done counter are added to the counter's series. From the two series
`summarize` computes:

- the lag of each count sample: the seconds since the done counter first reached the
  table's count (or 1, while the table had no completed row). The lag is 0 when the
  counter was no higher than the table's count at the sample.
- the state changes per second that reached the table over the drain. The drain runs
  from the first sample with a completed row to the first sample with all of them.
  The rate is the completed rows added in between ÷ its seconds, times 3 (pending,
  running, completed).

Each sample is one `SELECT COUNT(*)` over the status index. When that query gets slow,
as it does on a large table, the sampler waits longer, so that it spends no more than
about a tenth of the wall time in the query.
"""

import bisect
import sqlite3
import statistics
import threading
import time

import pymysql
import redis

from harness.stats import nearest_rank

DONE_KEY = "bench:done"
# Seconds between two samples of the SQL count and the done counter.
SAMPLE_SECONDS = 0.05
# The sampler waits at least this many times the median duration of the last
# QUERY_WINDOW count queries before the next sample. The median keeps one slow query, such
# as one that waited for the mirror's CREATE TABLE, from stopping the sampling for long.
QUERY_DUTY_FACTOR = 10
QUERY_WINDOW = 5
# Each finished task went through these many state changes, each one mirrored to SQL.
STATE_CHANGES_PER_TASK = 3
COUNT_SQL = "SELECT COUNT(*) FROM taskvisor_tasks WHERE status = 'completed'"
# Seconds that one count query may wait for a lock or a reply.
QUERY_TIMEOUT_SECONDS = 1


class RowCounter:
    """A counter of the completed rows of the SQL mirror, read through one connection.

    `query_seconds` collects the duration of every count query that returned, without the
    connection set-up. Each subclass defines how to connect and which errors a query may raise.
    """

    errors: tuple[type[Exception], ...] = ()

    def __init__(self) -> None:
        self.connection = None
        self.query_seconds: list[float] = []

    def open(self):
        raise NotImplementedError

    def completed(self) -> int | None:
        """Return the number of completed rows, or None while the table does not exist yet or the query failed."""
        try:
            if self.connection is None:
                self.connection = self.open()
            began = time.perf_counter()
            cursor = self.connection.cursor()
            cursor.execute(COUNT_SQL)
            count = cursor.fetchone()[0]
            cursor.close()
        except self.errors:
            self.close()
            return None
        self.query_seconds.append(time.perf_counter() - began)
        return count

    def close(self) -> None:
        if self.connection is not None:
            try:
                self.connection.close()
            except self.errors:
                pass
            self.connection = None


class SqliteCounter(RowCounter):
    """A counter of the completed rows of a SQLite mirror, through a read-only connection."""

    errors = (sqlite3.Error,)

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path

    def open(self) -> sqlite3.Connection:
        # The sampler thread uses the connection, and after it has ended, MirrorSampler.stop() does.
        return sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=QUERY_TIMEOUT_SECONDS, check_same_thread=False)


class MariadbCounter(RowCounter):
    """A counter of the completed rows of a MariaDB mirror, through an autocommit connection."""

    errors = (pymysql.MySQLError,)

    def __init__(self, connect) -> None:
        super().__init__()
        # `connect(timeout)` opens a pymysql connection to the mirror's database.
        self.connect = connect

    def open(self) -> pymysql.Connection:
        return self.connect(QUERY_TIMEOUT_SECONDS)


class MirrorSampler:
    """A daemon thread that samples the SQL count and the done counter until `stop()`."""

    def __init__(self, redis_url: str, counter: RowCounter, count: int, began: float) -> None:
        self.client = redis.Redis.from_url(redis_url)
        self.counter = counter
        self.count = count
        # The perf_counter time at which the workers started. The report gives sample times from it.
        self.began = began
        # (perf_counter time, completed rows, done counter) of each sample with a count.
        self.samples: list[tuple[float, int, int]] = []
        # (perf_counter time, done counter) read by the harness's main loop, added by the caller.
        self.done_readings: list[tuple[float, int]] = []
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self.run, name="mirror-sampler", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def sample(self) -> int | None:
        """Take one sample: the SQL count first, so the done counter read after it is never behind it."""
        completed = self.counter.completed()
        if completed is None:
            return None
        at = time.perf_counter()
        done = int(self.client.get(DONE_KEY) or 0)
        self.samples.append((at, completed, done))
        return completed

    def run(self) -> None:
        while True:
            began = time.perf_counter()
            completed = self.sample()
            if completed is not None and completed >= self.count:
                return
            recent = self.counter.query_seconds[-QUERY_WINDOW:]
            interval = max(SAMPLE_SECONDS, QUERY_DUTY_FACTOR * statistics.median(recent)) if recent else SAMPLE_SECONDS
            if self.stopped.wait(max(0.0, interval - (time.perf_counter() - began))):
                return

    def stop(self) -> dict:
        """Stop sampling, take a last sample if the table was not yet complete, and return `summarize`'s figures."""
        self.stopped.set()
        self.thread.join()
        if not self.samples or self.samples[-1][1] < self.count:
            self.sample()
        self.counter.close()
        self.client.close()
        return summarize(self.samples, self.done_readings, self.counter.query_seconds, self.count, self.began)


def first_reached(readings: list[tuple[float, int]]) -> tuple[list[int], list[float]]:
    """Turn done-counter readings into a step function: the running maximum of the counter and the time of each step."""
    levels: list[int] = []
    times: list[float] = []
    for at, done in sorted(readings):
        if not levels or done > levels[-1]:
            levels.append(done)
            times.append(at)
    return levels, times


def summarize(samples: list[tuple[float, int, int]], done_readings: list[tuple[float, int]], query_seconds: list[float],
              count: int, began: float) -> dict:  # fmt: skip
    """Return the lag p99 and maximum, the drain's state changes per second, the sampling's own cost and the samples.

    Each sample is returned as [seconds since `began`, completed rows, done counter].
    """
    result: dict = {"samples": len(samples), "tasks": count}
    if query_seconds:
        ordered = sorted(query_seconds)
        result["count_query_p50_ms"] = round(nearest_rank(ordered, 0.50) * 1000, 2)
        result["count_query_max_ms"] = round(ordered[-1] * 1000, 2)
    levels, times = first_reached(done_readings + [(at, done) for at, _completed, done in samples])
    lags = []
    for at, completed, done in samples:
        if done <= completed:
            lags.append(0.0)
            continue
        # The counter's first reading at or above the table's count, found in the step function.
        index = bisect.bisect_left(levels, max(completed, 1))
        lags.append(max(0.0, at - times[index]))
    if lags:
        ordered = sorted(lags)
        result["lag_max_seconds"] = round(ordered[-1], 4)
        result["lag_p99_seconds"] = round(nearest_rank(ordered, 0.99), 4)
        worst = lags.index(ordered[-1])
        result["lag_max_at_seconds"] = round(samples[worst][0] - began, 3)

    started = next((sample for sample in samples if sample[1] > 0), None)
    finished = next((sample for sample in samples if sample[1] >= count), None)
    if started is not None and finished is not None and finished[0] > started[0]:
        rows_per_second = (finished[1] - started[1]) / (finished[0] - started[0])
        result["state_changes_per_second"] = round(rows_per_second * STATE_CHANGES_PER_TASK, 1)
        result["drain_seconds"] = round(finished[0] - started[0], 3)
    result["series"] = [[round(at - began, 3), completed, done] for at, completed, done in samples]
    return result
