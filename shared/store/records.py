"""Rows the SQL mirror writes, built from the task snapshots in the event streams."""

import msgspec


class TaskRecord(msgspec.Struct):
    """One row of `taskvisor_tasks`. Times are UTC seconds since the epoch.

    `version` grows by one with every state change of the task; a write with a version
    not above the stored one is ignored, so replaying old events never moves a task back.
    `task_data` and `result` are JSON text with secrets already replaced by ***.
    """

    id: str
    provider_id: str
    instance_id: str | None
    user_id: str
    task_type: str
    status: str
    progress: float
    status_message: str
    error_message: str
    task_data: str
    result: str | None
    timeout_seconds: float
    attempts: int
    version: int
    created_at: float
    started_at: float | None
    completed_at: float | None
    updated_at: float


class InstanceRecord(msgspec.Struct):
    """One row of `taskvisor_instances`, keyed by (provider_id, id).

    `version` is the event stream position of the change, so the same rule applies:
    an older change never overwrites a newer one.
    """

    id: str
    provider_id: str
    status: str
    last_task_id: str
    version: int
    updated_at: float
