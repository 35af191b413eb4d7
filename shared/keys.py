"""Redis key names, part of the public producer contract (see docs/protocol.md).

Every key of one provider carries the provider id as a Redis Cluster hash tag, so a
provider's keys share a slot and the multi-key Lua scripts stay legal on a cluster.
"""

import re

PROVIDER_ID_PATTERN = re.compile(r"^[A-Za-z0-9._-]{1,64}$")

# Consumer groups on a provider's task stream.
WORKER_GROUP = "workers"
# Consumer group on a provider's event stream, read by the SQL mirror.
MIRROR_GROUP = "mirror"
# Pub/sub channel on which cancel notices are published as `<provider> <task id>`.
CANCEL_CHANNEL_SUFFIX = "cancel"


class Keys:
    """Key names under one configurable prefix (default `taskvisor`)."""

    def __init__(self, prefix: str = "taskvisor") -> None:
        self.prefix = prefix

    def tasks(self, provider: str) -> str:
        """Stream that producers XADD task entries to."""
        return f"{self.prefix}:{{{provider}}}:tasks"

    def task(self, provider: str, task_id: str) -> str:
        """Hash with the current state of one task."""
        return f"{self.prefix}:{{{provider}}}:task:{task_id}"

    def history(self, provider: str, task_id: str) -> str:
        """List of the task's state changes and progress reports as JSON, the last 100."""
        return f"{self.prefix}:{{{provider}}}:history:{task_id}"

    def events(self, provider: str) -> str:
        """Stream of state changes, one entry per change, in order."""
        return f"{self.prefix}:{{{provider}}}:events"

    def dead(self, provider: str) -> str:
        """Stream of rejected entries with the reason."""
        return f"{self.prefix}:{{{provider}}}:dead"

    def instances(self, provider: str) -> str:
        """Hash of instance id to instance status."""
        return f"{self.prefix}:{{{provider}}}:instances"

    def lease(self, provider: str, task_id: str) -> str:
        """Key held by the worker running a task, kept alive by its heartbeat."""
        return f"{self.prefix}:{{{provider}}}:lease:{task_id}"

    def instance_queue(self, provider: str, instance: str) -> str:
        """Sorted set of the unfinished entries of one instance, in stream order."""
        return f"{self.instance_queue_prefix(provider)}{instance}"

    def instance_queue_prefix(self, provider: str) -> str:
        return f"{self.prefix}:{{{provider}}}:queue:"

    def busy(self, provider: str) -> str:
        """Hash of worker owner (`<consumer>:<pid>`) to `<task id> <start time>` while it runs a task."""
        return f"{self.prefix}:{{{provider}}}:busy"

    def retries(self, provider: str) -> str:
        """Sorted set of entry ids waiting for an automatic retry, scored by due time in milliseconds."""
        return f"{self.prefix}:{{{provider}}}:retries"

    def limit(self, provider: str) -> str:
        """Return the key of the provider's concurrency limit across all supervisors, which they write."""
        return f"{self.prefix}:{{{provider}}}:limit"

    def task_index(self) -> str:
        """Hash of task id to `<provider> <entry id>`, which keeps task ids unique across providers."""
        return f"{self.prefix}:task-index"

    def cancel_channel(self) -> str:
        return f"{self.prefix}:{CANCEL_CHANNEL_SUFFIX}"

    def provider_from_task_key(self, key: str) -> str:
        start = key.index("{") + 1
        return key[start : key.index("}", start)]
