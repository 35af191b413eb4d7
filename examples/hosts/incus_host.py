#!/usr/bin/env python3
"""taskvisor command for an Incus host over SSH, with the `incus` client on that host.

Usage, as the provider's command for every task type:
    ["./incus_host.py", "{type}", "{instance}", "{id}"]

The instance id is the Incus instance name: 1-63 letters, digits and '-', starting
with a letter and not ending with '-'. That excludes the `remote:` and `/snapshot`
forms the incus client would otherwise read from a name. The SSH settings come from
driver.env: INCUS_HOST (required), INCUS_USER, INCUS_PORT, INCUS_IDENTITY,
INCUS_SUDO, INCUS_CONNECT_TIMEOUT and INCUS_STOP_TIMEOUT (see hostlib.Remote).

create reads data.image (such as `images:debian/12`), and optionally data.type
(`container` or `vm`), data.memory (MiB), data.cores, data.profile and data.storage.
It stores the task id in the instance's config key `user.taskvisor.task`, takes the
snapshot `taskvisor-initial` and starts the instance. A rerun after an interruption
finishes the missing steps. reset restores that snapshot. reset-password runs
chpasswd in the running instance.
"""

import json
import re

from hostlib import (
    INITIAL_SNAPSHOT,
    Backend,
    HostError,
    PermanentError,
    check_known_fields,
    integer_field,
    main,
    password_line,
    progress,
    text_field,
)

INSTANCE_PATTERN = re.compile(r"[A-Za-z](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
# An image alias or fingerprint, optionally with its remote, such as images:debian/12.
IMAGE_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/:-]{0,254}")
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
TYPE_PATTERN = re.compile(r"container|vm")
MARKER_KEY = "user.taskvisor.task"
CREATE_FIELDS = ("image", "type", "memory", "cores", "profile", "storage")


class IncusBackend(Backend):
    env_prefix = "INCUS"

    def __init__(self, task, remote, environ) -> None:
        super().__init__(task, remote, environ)
        if not INSTANCE_PATTERN.fullmatch(task.instance):
            raise PermanentError(
                f"invalid instance id {task.instance!r}: expected an Incus instance name of 1-63 letters, digits "
                f"and '-', starting with a letter and not ending with '-'"
            )
        self.name = task.instance

    # -- reading the instance ----------------------------------------------------------

    def instance(self) -> dict | None:
        """Return the instance as `incus list` shows it, or None when it does not exist."""
        # `incus list NAME` matches every name that starts with NAME, so pick the exact one.
        output = self.remote.call(["incus", "list", self.name, "--format", "json"])
        try:
            instances = json.loads(output)
        except ValueError:
            raise HostError(f"unexpected output of `incus list {self.name} --format json`: {output[:200]!r}") from None
        for instance in instances or []:
            if isinstance(instance, dict) and instance.get("name") == self.name:
                return instance
        return None

    def existing(self) -> dict:
        instance = self.instance()
        if instance is None:
            raise PermanentError(f"instance {self.name} does not exist on {self.remote.host}")
        return instance

    @staticmethod
    def running(instance: dict) -> bool:
        return instance.get("status") == "Running"

    def has_snapshot(self) -> bool:
        listing = self.remote.call(["incus", "snapshot", "list", self.name, "--format", "csv", "--columns", "n"])
        return INITIAL_SNAPSHOT in (line.strip() for line in listing.splitlines())

    # -- power -------------------------------------------------------------------------

    def start_instance(self, instance: dict) -> None:
        if not self.running(instance):
            progress(60, f"starting {self.name}")
            self.remote.call(["incus", "start", self.name])

    def stop_instance(self, instance: dict) -> None:
        if not self.running(instance):
            return
        seconds = self.stop_timeout()
        progress(30, f"stopping {self.name}, forced after {seconds} s")
        completed = self.remote.run(["incus", "stop", self.name, "--timeout", str(seconds)])
        if completed.returncode != 0:
            progress(50, f"{self.name} did not stop within {seconds} s; forcing it")
            self.remote.call(["incus", "stop", self.name, "--force"])

    def start(self) -> dict:
        self.start_instance(self.existing())
        return {"instance": self.name, "state": "running"}

    def stop(self) -> dict:
        self.stop_instance(self.existing())
        return {"instance": self.name, "state": "stopped"}

    def restart(self) -> dict:
        self.stop_instance(self.existing())
        self.start_instance({"status": "Stopped"})
        return {"instance": self.name, "state": "running"}

    # -- lifecycle ---------------------------------------------------------------------

    def create(self) -> dict:
        data = self.task.data
        check_known_fields(data, CREATE_FIELDS)
        image = text_field(data, "image", IMAGE_PATTERN)
        kind = text_field(data, "type", TYPE_PATTERN, default="container")
        argv = ["incus", "create", image, self.name, "--config", f"{MARKER_KEY}={self.task.task_id}"]
        if "memory" in data:
            argv += ["--config", f"limits.memory={integer_field(data, 'memory', 0, 16, 4 * 1024 * 1024)}MiB"]
        if "cores" in data:
            argv += ["--config", f"limits.cpu={integer_field(data, 'cores', 0, 1, 512)}"]
        if "profile" in data:
            argv += ["--profile", text_field(data, "profile", NAME_PATTERN)]
        if "storage" in data:
            argv += ["--storage", text_field(data, "storage", NAME_PATTERN)]
        if kind == "vm":
            argv.append("--vm")

        instance = self.instance()
        if instance is None:
            progress(10, f"creating {self.name} from {image}")
            self.remote.call(argv)
            instance = {"status": "Stopped"}
        elif instance.get("config", {}).get(MARKER_KEY) != self.task.task_id:
            raise PermanentError(f"instance {self.name} exists but task {self.task.task_id} did not create it")
        else:
            progress(10, f"{self.name} exists from an earlier run of this task; finishing it")

        if not self.has_snapshot():
            progress(40, f"taking snapshot {INITIAL_SNAPSHOT}")
            self.remote.call(["incus", "snapshot", "create", self.name, INITIAL_SNAPSHOT])
        self.start_instance(instance)
        return {"instance": self.name, "state": "running", "snapshot": INITIAL_SNAPSHOT}

    def delete(self) -> dict:
        if self.instance() is None:
            return {"instance": self.name, "removed": False}
        progress(50, f"deleting {self.name}")
        self.remote.call(["incus", "delete", self.name, "--force"])
        return {"instance": self.name, "removed": True}

    def reset(self) -> dict:
        instance = self.existing()
        if not self.has_snapshot():
            raise PermanentError(
                f"instance {self.name} has no snapshot {INITIAL_SNAPSHOT} to reset to: take one, or create it again"
            )
        if self.running(instance):
            progress(20, f"stopping {self.name}")
            self.remote.call(["incus", "stop", self.name, "--force"])
        progress(40, f"restoring {INITIAL_SNAPSHOT}")
        self.remote.call(["incus", "snapshot", "restore", self.name, INITIAL_SNAPSHOT])
        self.start_instance({"status": "Stopped"})
        return {"instance": self.name, "state": "running"}

    def reset_password(self) -> dict:
        username, line = password_line(self.task.data)
        if not self.running(self.existing()):
            raise PermanentError(f"instance {self.name} is not running: start it before resetting a password")
        progress(40, f"setting the password of {username}")
        # The password travels only on stdin, never in a command line.
        self.remote.call(["incus", "exec", self.name, "--", "chpasswd"], input_text=line)
        return {"instance": self.name, "username": username}

    # -- probe -------------------------------------------------------------------------

    def probe(self) -> dict:
        instance = self.instance()
        if self.task.type == "delete":
            if instance is None:
                return {"outcome": "completed", "result": {"instance": self.name, "removed": True}}
            return {"outcome": "not_done"}
        if self.task.type != "create" or instance is None:
            return {"outcome": "not_done"}
        if instance.get("config", {}).get(MARKER_KEY) != self.task.task_id:
            return {"outcome": "failed", "error": f"instance {self.name} exists but task {self.task.task_id} did not create it"}
        if self.running(instance) and self.has_snapshot():
            return {"outcome": "completed", "result": {"instance": self.name, "state": "running", "snapshot": INITIAL_SNAPSHOT}}
        return {"outcome": "not_done"}


if __name__ == "__main__":
    main(IncusBackend)
