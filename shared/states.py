"""Task types, task statuses, the legal transitions between them, and instance statuses.

This module is the one place where transitions are decided. The Lua scripts in
`shared/lua/` receive the transition table generated from `TRANSITIONS`, so Redis
rejects an illegal move atomically, and the rules for instance statuses below are
what every worker passes to those scripts.
"""

from enum import StrEnum


class TaskType(StrEnum):
    CREATE = "create"
    START = "start"
    STOP = "stop"
    RESTART = "restart"
    DELETE = "delete"
    RESET = "reset"
    RESET_PASSWORD = "reset-password"


class TaskStatus(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    CANCELLING = "cancelling"
    COMPLETED = "completed"
    FAILED = "failed"
    TIMEOUT = "timeout"
    CANCELLED = "cancelled"


TERMINAL_STATUSES = frozenset(
    {TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.TIMEOUT, TaskStatus.CANCELLED}
)

# Legal moves. `running -> running` is a takeover by another worker after the first
# one lost its lease. `running -> pending` puts an interrupted task back in line for
# redelivery, for example when a shutdown grace period runs out.
TRANSITIONS: dict[TaskStatus, frozenset[TaskStatus]] = {
    TaskStatus.PENDING: frozenset({TaskStatus.RUNNING, TaskStatus.CANCELLED}),
    TaskStatus.RUNNING: frozenset(
        {
            TaskStatus.RUNNING,
            TaskStatus.PENDING,
            TaskStatus.CANCELLING,
            TaskStatus.COMPLETED,
            TaskStatus.FAILED,
            TaskStatus.TIMEOUT,
        }
    ),
    TaskStatus.CANCELLING: frozenset(
        {
            TaskStatus.CANCELLING,
            TaskStatus.PENDING,
            TaskStatus.CANCELLED,
            TaskStatus.COMPLETED,
            TaskStatus.FAILED,
            TaskStatus.TIMEOUT,
        }
    ),
    TaskStatus.COMPLETED: frozenset(),
    TaskStatus.FAILED: frozenset(),
    TaskStatus.TIMEOUT: frozenset(),
    TaskStatus.CANCELLED: frozenset(),
}

# Types that are safe to run again after an interrupted run: running them twice ends
# in the same place as running them once. The others (create, delete, reset) are not
# repeated blindly; see `onInterrupt` in docs/configuration.md.
IDEMPOTENT_TYPES = frozenset({TaskType.START, TaskType.STOP, TaskType.RESTART, TaskType.RESET_PASSWORD})

# Default timeouts in seconds, counted from the moment a worker starts the task.
DEFAULT_TIMEOUTS: dict[TaskType, float] = {
    TaskType.CREATE: 1800,
    TaskType.START: 300,
    TaskType.STOP: 300,
    TaskType.RESTART: 600,
    TaskType.DELETE: 600,
    TaskType.RESET: 1200,
    TaskType.RESET_PASSWORD: 600,
}


class InstanceStatus(StrEnum):
    CREATING = "creating"
    STARTING = "starting"
    STOPPING = "stopping"
    RESTARTING = "restarting"
    DELETING = "deleting"
    RESETTING = "resetting"
    RUNNING = "running"
    STOPPED = "stopped"
    DELETED = "deleted"
    ERROR = "error"


# Instance status while a task of each type runs. A reset-password task leaves the
# instance status alone: the instance keeps running while its password changes.
INSTANCE_WHILE_RUNNING: dict[TaskType, InstanceStatus | None] = {
    TaskType.CREATE: InstanceStatus.CREATING,
    TaskType.START: InstanceStatus.STARTING,
    TaskType.STOP: InstanceStatus.STOPPING,
    TaskType.RESTART: InstanceStatus.RESTARTING,
    TaskType.DELETE: InstanceStatus.DELETING,
    TaskType.RESET: InstanceStatus.RESETTING,
    TaskType.RESET_PASSWORD: None,
}

INSTANCE_ON_SUCCESS: dict[TaskType, InstanceStatus | None] = {
    TaskType.CREATE: InstanceStatus.RUNNING,
    TaskType.START: InstanceStatus.RUNNING,
    TaskType.STOP: InstanceStatus.STOPPED,
    TaskType.RESTART: InstanceStatus.RUNNING,
    TaskType.DELETE: InstanceStatus.DELETED,
    TaskType.RESET: InstanceStatus.RUNNING,
    TaskType.RESET_PASSWORD: None,
}

# After a failure or timeout; None means "the status from before the task".
INSTANCE_ON_FAILURE: dict[TaskType, InstanceStatus | None] = {
    TaskType.CREATE: InstanceStatus.ERROR,
    TaskType.START: InstanceStatus.STOPPED,
    TaskType.STOP: None,
    TaskType.RESTART: None,
    TaskType.DELETE: None,
    TaskType.RESET: None,
    TaskType.RESET_PASSWORD: None,
}

# After a cancel; None means "the status from before the task".
INSTANCE_ON_CANCEL: dict[TaskType, InstanceStatus | None] = {
    TaskType.CREATE: InstanceStatus.ERROR,
    TaskType.START: InstanceStatus.STOPPED,
    TaskType.STOP: InstanceStatus.RUNNING,
    TaskType.RESTART: None,
    TaskType.DELETE: None,
    TaskType.RESET: None,
    TaskType.RESET_PASSWORD: None,
}

# Statuses an instance has only while one of its tasks runs.
TRANSITIONAL_INSTANCE_STATUSES = frozenset(status for status in INSTANCE_WHILE_RUNNING.values() if status is not None)

# Instructions understood by the Lua scripts for the instance hash.
INSTANCE_KEEP = "keep"
INSTANCE_RESTORE = "restore"


def instance_rule_after(task_type: TaskType, status: TaskStatus) -> str:
    """Return the instance instruction for a task of `task_type` that ends in `status`.

    The result is a status to set, INSTANCE_RESTORE for "the status from before the
    task", or INSTANCE_KEEP when the task type never touches the instance status.
    A task put back to pending restores the status from before it.
    """
    if INSTANCE_WHILE_RUNNING[task_type] is None:
        return INSTANCE_KEEP
    if status == TaskStatus.COMPLETED:
        table = INSTANCE_ON_SUCCESS
    elif status == TaskStatus.CANCELLED:
        table = INSTANCE_ON_CANCEL
    elif status == TaskStatus.PENDING:
        return INSTANCE_RESTORE
    else:
        table = INSTANCE_ON_FAILURE
    target = table[task_type]
    return INSTANCE_RESTORE if target is None else str(target)


def instance_rule_given_up(task_type: TaskType) -> str:
    """The instance instruction when an interrupted run is given up (no probe, or poison).

    What the interrupted run left behind is unknown, so the instance is marked as
    needing attention, except for types that never touch the instance status.
    """
    if INSTANCE_WHILE_RUNNING[task_type] is None:
        return INSTANCE_KEEP
    return str(InstanceStatus.ERROR)


def instance_rule_while_running(task_type: TaskType) -> str:
    target = INSTANCE_WHILE_RUNNING[task_type]
    return INSTANCE_KEEP if target is None else str(target)


def lua_transition_table() -> str:
    """Render TRANSITIONS as a Lua table constructor for the state scripts."""
    rows = []
    for source, targets in TRANSITIONS.items():
        inner = ", ".join(f'["{target}"] = true' for target in sorted(targets))
        rows.append(f'["{source}"] = {{{inner}}}')
    return "local ALLOWED = {" + ", ".join(rows) + "}\n"
