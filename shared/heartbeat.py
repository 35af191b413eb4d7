"""The heartbeat table: one slot per process of a supervisor, in shared memory.

The supervisor creates the table before it forks anything. `mmap.mmap(-1, size)` is
an anonymous MAP_SHARED mapping on Linux, so every forked child maps the same pages,
and the table needs neither Redis nor a file. Slot 0 belongs to the supervisor. At
each fork the supervisor gives the child a slot and writes who owns it. At each reap
it marks the slot as exited, with the wait status, and keeps that record readable for
a while before the slot is given out again. The child writes its own heartbeat into
its slot. The monitor process reads the table to serve /healthz, /readyz, /status
and /metrics.

Each slot has three parts, and each part has one writer:

- the owner part, written by the supervisor: state, pid, role, provider, worker slot,
  flags, wait status, fork time and exit time;
- the beat part, written by the process in the slot: its pid, the heartbeat time,
  an announced pause, the start time of its current task and the number of tasks done;
- the counter part, also written by the process in the slot: how often it lost its
  connection to Redis or to the SQL database and retried (see `count_reconnect`).

There are no locks between processes. A write is a `struct.pack_into` of one part,
which is several stores, so a reader can see a part half written. `read_slot` copies
the slot twice and accepts the copy once two copies in a row are equal. Parts change
a few times a second at most, so an equal pair means no write happened in between.
If the copies keep differing, the last one is used. A torn heartbeat time can then
give one wrong age for one request. The next request reads it right, and a process
that really stopped writing stays stale on every read, so no lasting verdict depends
on one torn read.

Beside the slots, the table has a board: one more shared mapping that contains the
SQL mirror's counts of ended tasks, for the monitor's /metrics (see
supervisor/metrics.py). It has one writer, the mirror, and the monitor reads it with
a sequence number: the writer makes the number odd before it writes and even after,
and a reader accepts a copy only when it saw the same even number before and after
copying.

Times: heartbeats, fork and exit times use `time.monotonic()`, which is
CLOCK_MONOTONIC, one clock for every process on a Linux host. A change of the wall
clock cannot make a heartbeat look old. Task start times are Unix times, like the
status hash, because they are shown to people.
"""

import logging
import mmap
import os
import signal
import struct
import threading
import time
from collections import deque

import msgspec

log = logging.getLogger(__name__)

# For example 15 providers of 256 workers each, plus the other processes and recent
# exit records. Pages of an anonymous mapping take memory only once written, so unused
# slots cost no memory.
SLOT_COUNT = 4096
SUPERVISOR_SLOT = 0
# Returned by `assign` when every slot is taken.
NO_SLOT = -1

ROLE_CODES = {"supervisor": 1, "intake": 2, "mirror": 3, "worker": 4, "monitor": 5}
ROLE_NAMES = {code: name for name, code in ROLE_CODES.items()}

# Slot states.
FREE = 0
LIVE = 1
EXITED = 2

# Owner flags.
# The supervisor requested the exit (resize, restart, removal or shutdown) before the process exited.
FLAG_EXIT_REQUESTED = 1
# Supervisor slot only: a shutdown is in progress.
FLAG_STOPPING = 2

# Owner part: state, pid, role code, worker slot, flags, wait status, fork time,
# exit time, provider id (at most 64 ASCII characters).
_OWNER = struct.Struct("=IiHHIi4xdd64s")
# Beat part: pid, heartbeat time, announced pause in seconds, task start (Unix time,
# 0 when idle), tasks done.
_BEAT = struct.Struct("=i4xdddQ")
# Counter part: Redis reconnects, database reconnects.
_COUNTERS = struct.Struct("=QQ")
RECONNECT_TARGETS = ("redis", "database")
SLOT_SIZE = _OWNER.size + _BEAT.size + _COUNTERS.size
# Copies of a slot that `read_slot` makes at most while looking for two equal ones.
_READ_ATTEMPTS = 4
# Bytes of the board. Like the slots, its pages take memory only once written.
BOARD_BYTES = 4 * 1024 * 1024
# Board header: sequence number (odd while a write is under way), length of the contents.
_BOARD_HEADER = struct.Struct("=QQ")
# Looks at the board that `read_board` makes at most, 1 ms apart, while a write is under way.
_BOARD_READ_ATTEMPTS = 100


class Slot(msgspec.Struct, frozen=True):
    """One decoded slot of the table."""

    index: int
    state: int
    pid: int
    role: str
    provider: str
    worker_slot: int
    flags: int
    # The raw status from os.waitpid, valid when `state` is EXITED.
    wait_status: int
    # time.monotonic() of the fork and of the reap (0 while running).
    started: float
    ended: float
    # The pid the process wrote itself, 0 before its first heartbeat.
    beat_pid: int
    # time.monotonic() of the last heartbeat, 0 before the first one.
    heartbeat: float
    # Seconds the process announced it will not send heartbeats (a retry delay).
    pause: float
    task_started_at: float
    # Tasks a worker finished; task rows the mirror wrote.
    tasks_done: int
    # Times the process lost its connection and retried, per target in RECONNECT_TARGETS.
    redis_reconnects: int = 0
    database_reconnects: int = 0

    @property
    def has_beaten(self) -> bool:
        return self.heartbeat > 0 and self.beat_pid == self.pid

    def describe(self) -> str:
        """Name the process for messages, such as `worker p/0 pid 123`."""
        if self.role == "worker":
            return f"worker {self.provider}/{self.worker_slot} pid {self.pid}"
        return f"{self.role} pid {self.pid}"


class HeartbeatTable:
    """The shared table. Only the supervisor calls the methods that assign and release slots."""

    def __init__(self, slot_count: int = SLOT_COUNT, exit_record_seconds: float = 60.0) -> None:
        self.slot_count = slot_count
        # An exit record stays readable at least this long before its slot is reused.
        self.exit_record_seconds = exit_record_seconds
        # MAP_SHARED | MAP_ANONYMOUS: shared with every child forked after this point.
        self.memory = mmap.mmap(-1, slot_count * SLOT_SIZE)
        self.board = mmap.mmap(-1, BOARD_BYTES)
        self._next_unused = SUPERVISOR_SLOT + 1
        self._released: deque[tuple[float, int]] = deque()
        self._pending: dict[int, tuple[str, str, int, float]] = {}
        self._supervisor_started = time.monotonic()
        self._supervisor_flags = 0
        self._write_owner(SUPERVISOR_SLOT, LIVE, os.getpid(), "supervisor", "", 0, 0, 0, self._supervisor_started, 0.0)
        # The process that creates the table is the supervisor: its own reconnects count in
        # slot 0 until `attach` in a forked child points the counters at the child's slot.
        global _counters
        _counters = _CounterWriter(self, SUPERVISOR_SLOT)

    # -- supervisor side ------------------------------------------------------------

    def assign(self, role: str, provider: str, worker_slot: int) -> int:
        """Reserve a slot for a process about to be forked; returns its index or NO_SLOT."""
        index = self._take_index()
        if index == NO_SLOT:
            log.error("heartbeat table full: %d slots in use; the new %s process gets no heartbeat slot", self.slot_count, role)
            return NO_SLOT
        _BEAT.pack_into(self.memory, index * SLOT_SIZE + _OWNER.size, 0, 0.0, 0.0, 0.0, 0)
        _COUNTERS.pack_into(self.memory, index * SLOT_SIZE + _OWNER.size + _BEAT.size, 0, 0)
        self._pending[index] = (role, provider, worker_slot, time.monotonic())
        return index

    def set_pid(self, index: int, pid: int) -> None:
        """Mark a reserved slot as live for the forked child `pid`."""
        if index == NO_SLOT:
            return
        role, provider, worker_slot, started = self._pending.pop(index)
        self._write_owner(index, LIVE, pid, role, provider, worker_slot, 0, 0, started, 0.0)

    def cancel(self, index: int) -> None:
        """Give back a slot reserved for a fork that failed."""
        if index == NO_SLOT:
            return
        self._pending.pop(index, None)
        self._released.appendleft((0.0, index))

    def release(self, index: int, wait_status: int, exit_requested: bool) -> None:
        """Record that the process in a slot exited; the record stays for `exit_record_seconds`."""
        if index == NO_SLOT:
            return
        slot = self.read_slot(index)
        flags = FLAG_EXIT_REQUESTED if exit_requested else 0
        now = time.monotonic()
        self._write_owner(
            index, EXITED, slot.pid, slot.role, slot.provider, slot.worker_slot, flags, wait_status, slot.started, now
        )
        self._released.append((now, index))

    def beat_supervisor(self, stopping: bool) -> None:
        """Write the supervisor's own heartbeat into slot 0."""
        flags = FLAG_STOPPING if stopping else 0
        if flags != self._supervisor_flags:
            self._supervisor_flags = flags
            self._write_owner(SUPERVISOR_SLOT, LIVE, os.getpid(), "supervisor", "", 0, flags, 0, self._supervisor_started, 0.0)
        offset = SUPERVISOR_SLOT * SLOT_SIZE + _OWNER.size
        _BEAT.pack_into(self.memory, offset, os.getpid(), time.monotonic(), 0.0, 0.0, 0)

    def _take_index(self) -> int:
        """Return a free slot: an old exit record first, then a never used slot, then any exit record."""
        if self._released and time.monotonic() - self._released[0][0] >= self.exit_record_seconds:
            return self._released.popleft()[1]
        if self._next_unused < self.slot_count:
            self._next_unused += 1
            return self._next_unused - 1
        if self._released:
            return self._released.popleft()[1]
        return NO_SLOT

    def _write_owner(
        self, index: int, state: int, pid: int, role: str, provider: str, worker_slot: int,
        flags: int, wait_status: int, started: float, ended: float,
    ) -> None:  # fmt: skip
        _OWNER.pack_into(
            self.memory, index * SLOT_SIZE, state, pid, ROLE_CODES[role], worker_slot, flags, wait_status,
            started, ended, provider.encode("ascii", "replace"),
        )  # fmt: skip

    # -- reading ------------------------------------------------------------------

    def read_slot(self, index: int) -> Slot:
        start = index * SLOT_SIZE
        raw = self.memory[start : start + SLOT_SIZE]
        for _attempt in range(_READ_ATTEMPTS):
            again = self.memory[start : start + SLOT_SIZE]
            if again == raw:
                break
            raw = again
        return _decode(index, raw)

    def read_all(self) -> list[Slot]:
        """Return every slot that is live or contains an exit record, slot 0 first."""
        image = self.memory[:]
        empty = bytes(4)
        slots = []
        for index in range(self.slot_count):
            start = index * SLOT_SIZE
            if image[start : start + 4] != empty:
                slots.append(self.read_slot(index))
        return slots

    def publish(self, contents: bytes) -> bool:
        """Replace the board's contents, or return False when they do not fit. Only one process may write."""
        board = self.board
        if _BOARD_HEADER.size + len(contents) > len(board):
            return False
        # A writer that died halfway left an odd number, which stays odd here.
        sequence = _BOARD_HEADER.unpack_from(board, 0)[0] | 1
        _BOARD_HEADER.pack_into(board, 0, sequence, 0)
        board[_BOARD_HEADER.size : _BOARD_HEADER.size + len(contents)] = contents
        _BOARD_HEADER.pack_into(board, 0, sequence + 1, len(contents))
        return True

    def read_board(self) -> bytes:
        """Return the board's contents: b"" when nothing was published or no write finished in time."""
        board = self.board
        for _attempt in range(_BOARD_READ_ATTEMPTS):
            sequence, length = _BOARD_HEADER.unpack_from(board, 0)
            if not sequence & 1:
                contents = board[_BOARD_HEADER.size : _BOARD_HEADER.size + length]
                if _BOARD_HEADER.unpack_from(board, 0)[0] == sequence:
                    return contents
            time.sleep(0.001)
        return b""


def _decode(index: int, raw: bytes) -> Slot:
    state, pid, role_code, worker_slot, flags, wait_status, started, ended, provider = _OWNER.unpack_from(raw, 0)
    beat_pid, heartbeat, pause, task_started_at, tasks_done = _BEAT.unpack_from(raw, _OWNER.size)
    redis_reconnects, database_reconnects = _COUNTERS.unpack_from(raw, _OWNER.size + _BEAT.size)
    return Slot(
        index=index,
        state=state,
        pid=pid,
        role=ROLE_NAMES.get(role_code, "unknown"),
        provider=provider.rstrip(b"\0").decode("ascii", "replace"),
        worker_slot=worker_slot,
        flags=flags,
        wait_status=wait_status,
        started=started,
        ended=ended,
        beat_pid=beat_pid,
        heartbeat=heartbeat,
        pause=pause,
        task_started_at=task_started_at,
        tasks_done=tasks_done,
        redis_reconnects=redis_reconnects,
        database_reconnects=database_reconnects,
    )


def describe_exit(wait_status: int) -> str:
    """Describe an os.waitpid status, such as `killed by SIGKILL` or `exited with code 3`."""
    if os.WIFSIGNALED(wait_status):
        number = os.WTERMSIG(wait_status)
        try:
            return f"killed by {signal.Signals(number).name}"
        except ValueError:
            return f"killed by signal {number}"
    return f"exited with code {os.WEXITSTATUS(wait_status)}"


# -- the child side: one writer per process -------------------------------------------


class _SlotWriter:
    def __init__(self, table: HeartbeatTable, index: int) -> None:
        self.table = table
        self.offset = index * SLOT_SIZE + _OWNER.size
        self.pid = os.getpid()
        self.task_started_at = 0.0
        self.tasks_done = 0
        # time.monotonic() of the last `note_loop` call.
        self.loop_at = time.monotonic()
        self.stall_logged = False
        # Workers write from their main thread and from a heartbeat thread.
        self.lock = threading.Lock()

    def write(self, pause: float) -> None:
        with self.lock:
            _BEAT.pack_into(
                self.table.memory, self.offset, self.pid, time.monotonic(), pause, self.task_started_at, self.tasks_done
            )


class _CounterWriter:
    """Writer of the counter part of one slot; any thread of the owning process may call `add`."""

    def __init__(self, table: HeartbeatTable, index: int) -> None:
        self.table = table
        self.offset = index * SLOT_SIZE + _OWNER.size + _BEAT.size
        self.counts = dict.fromkeys(RECONNECT_TARGETS, 0)
        self.lock = threading.Lock()

    def add(self, target: str) -> None:
        with self.lock:
            self.counts[target] += 1
            _COUNTERS.pack_into(self.table.memory, self.offset, *(self.counts[name] for name in RECONNECT_TARGETS))


_writer: _SlotWriter | None = None
_counters: _CounterWriter | None = None
# The table of this process's supervisor, for the board. None outside a supervisor.
_table: HeartbeatTable | None = None


def attach(table: HeartbeatTable | None, index: int) -> None:
    """Make this process (right after the fork) write its heartbeats and counters into slot `index`."""
    global _writer, _counters, _table
    attached = table is not None and index != NO_SLOT
    _writer = _SlotWriter(table, index) if attached else None
    _counters = _CounterWriter(table, index) if attached else None
    _table = table


def publish_board(contents: bytes) -> bool:
    """Put `contents` on the supervisor's board, or return False when they do not fit. Without a table it does nothing."""
    table = _table
    return table is None or table.publish(contents)


def read_board() -> bytes:
    """Return the contents of the supervisor's board, b"" when empty or without a table."""
    table = _table
    return table.read_board() if table is not None else b""


def count_reconnect(target: str) -> None:
    """Count one lost connection to `target` ("redis" or "database"); does nothing without a slot.

    shared/logs.py calls it for the log lines that report such a loss, so the processes
    need no code of their own for it.
    """
    counters = _counters
    if counters is not None and target in counters.counts:
        counters.add(target)


def beat(*, task_started_at: float | None = None, tasks_done: int | None = None, pause: float = 0.0) -> None:
    """Write a heartbeat now; does nothing in a process without a slot.

    `task_started_at` (Unix time, 0 for idle) and `tasks_done` are kept for later
    heartbeats. `pause` announces that the next heartbeat may come up to that many
    seconds late, for example during a retry delay, so the delay is not taken for a stall.
    """
    writer = _writer
    if writer is None:
        return
    if task_started_at is not None:
        writer.task_started_at = task_started_at
    if tasks_done is not None:
        writer.tasks_done = tasks_done
    writer.write(pause)


def note_loop() -> None:
    """Record that the process's main loop ran; see `beat_unless_stalled`."""
    writer = _writer
    if writer is not None:
        writer.loop_at = time.monotonic()


def beat_unless_stalled(stall_seconds: float) -> None:
    """Write a heartbeat from a helper thread, unless the main loop has stalled.

    The main loop counts as stalled when no task runs and `note_loop` was last called
    more than `stall_seconds` ago. A stalled process stops beating, so the monitor
    reports it, although the helper thread itself still runs.
    """
    writer = _writer
    if writer is None:
        return
    idle_for = time.monotonic() - writer.loop_at
    if writer.task_started_at == 0 and idle_for > stall_seconds:
        if not writer.stall_logged:
            writer.stall_logged = True
            log.error("main loop has not run for %.0f s; heartbeats stop until it runs again pid=%d", idle_for, writer.pid)
        return
    if writer.stall_logged:
        writer.stall_logged = False
        log.info("main loop runs again; heartbeats resume pid=%d", writer.pid)
    writer.write(0.0)
