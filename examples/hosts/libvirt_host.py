#!/usr/bin/env python3
"""taskvisor command for a libvirt (KVM) host over SSH, with `virsh` and `virt-clone` there.

Usage, as the provider's command for every task type:
    ["./libvirt_host.py", "{type}", "{instance}", "{id}"]

The instance id is the domain name: 1-64 characters of A-Za-z0-9._- starting with a
letter or digit. The SSH settings come from driver.env: LIBVIRT_HOST (required),
LIBVIRT_USER, LIBVIRT_PORT, LIBVIRT_IDENTITY, LIBVIRT_SUDO, LIBVIRT_CONNECT_TIMEOUT
and LIBVIRT_STOP_TIMEOUT (see hostlib.Remote). virsh on the host uses its default
connection URI; set LIBVIRT_DEFAULT_URI for the remote user (qemu:///system) if needed.

create clones data.template (a shut-off domain) with `virt-clone --auto-clone`, sets
optional data.memory (MiB) and data.cores, stores the task id in the domain's
description, takes the internal snapshot `taskvisor-initial` (qcow2 disks) and starts
the domain. reset reverts to that snapshot. stop sends the guest a shutdown request
and destroys (powers off) the domain when it still runs after the stop timeout.
reset-password uses the QEMU guest agent (`virsh set-user-password`).
"""

import re
import time

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

DOMAIN_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
CREATE_FIELDS = ("template", "memory", "cores")
NO_DESCRIPTION = "No description for domain"
# Seconds between two state checks while a domain shuts down.
POLL_SECONDS = 2.0


def virsh_quote(text: str) -> str:
    """Quote one argument for virsh's own command parser, which follows the POSIX shell's rules."""
    return "'" + text.replace("'", "'\\''") + "'"


class LibvirtBackend(Backend):
    env_prefix = "LIBVIRT"

    def __init__(self, task, remote, environ) -> None:
        super().__init__(task, remote, environ)
        if not DOMAIN_PATTERN.fullmatch(task.instance):
            raise PermanentError(
                f"invalid instance id {task.instance!r}: expected a domain name of 1-64 characters of A-Za-z0-9._- "
                f"starting with a letter or digit"
            )
        self.name = task.instance

    # -- reading the domain ------------------------------------------------------------

    def state(self) -> str | None:
        """Return the domain's state, such as `running` or `shut off`; None when it does not exist."""
        completed = self.remote.run(["virsh", "domstate", self.name])
        if completed.returncode != 0:
            if "failed to get domain" in completed.stderr:
                return None
            raise HostError(self.remote.failure(["virsh", "domstate", self.name], completed))
        return completed.stdout.strip()

    def existing_state(self) -> str:
        state = self.state()
        if state is None:
            raise PermanentError(f"domain {self.name} does not exist on {self.remote.host}")
        return state

    def description(self) -> str:
        text = self.remote.call(["virsh", "desc", self.name]).strip()
        return "" if text.startswith(NO_DESCRIPTION) else text

    def has_snapshot(self) -> bool:
        listing = self.remote.call(["virsh", "snapshot-list", self.name, "--name"])
        return INITIAL_SNAPSHOT in (line.strip() for line in listing.splitlines())

    # -- power -------------------------------------------------------------------------

    def start_domain(self, state: str) -> None:
        if state != "running":
            progress(60, f"starting {self.name}")
            self.remote.call(["virsh", "start", self.name])

    def stop_domain(self, state: str) -> None:
        if state == "shut off":
            return
        seconds = self.stop_timeout()
        progress(30, f"shutting down {self.name}, powered off after {seconds} s")
        # `virsh shutdown` returns once the guest has the request, so wait for `shut off`.
        self.remote.call(["virsh", "shutdown", self.name])
        deadline = time.monotonic() + seconds
        while self.existing_state() != "shut off":
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                progress(50, f"{self.name} did not shut down within {seconds} s; powering it off")
                self.remote.call(["virsh", "destroy", self.name])
                return
            time.sleep(min(POLL_SECONDS, remaining))

    def start(self) -> dict:
        self.start_domain(self.existing_state())
        return {"instance": self.name, "state": "running"}

    def stop(self) -> dict:
        self.stop_domain(self.existing_state())
        return {"instance": self.name, "state": "stopped"}

    def restart(self) -> dict:
        self.stop_domain(self.existing_state())
        self.start_domain("shut off")
        return {"instance": self.name, "state": "running"}

    # -- lifecycle ---------------------------------------------------------------------

    def create(self) -> dict:
        data = self.task.data
        check_known_fields(data, CREATE_FIELDS)
        template = text_field(data, "template", DOMAIN_PATTERN)
        memory = integer_field(data, "memory", 0, 16, 4 * 1024 * 1024) if "memory" in data else None
        cores = integer_field(data, "cores", 0, 1, 512) if "cores" in data else None

        state = self.state()
        if state is None:
            progress(10, f"cloning {template} to {self.name}")
            self.remote.call(["virt-clone", "--original", template, "--name", self.name, "--auto-clone"])
            # NOTE: a run cut off between the clone and this step leaves a domain without
            # the marker. The next run and the probe then report it as made by another
            # task, so delete such a domain by hand.
            self.remote.call(["virsh", "desc", self.name, "--config", "--new-desc", self.task.marker])
            self.set_resources(memory, cores)
            state = "shut off"
        elif self.description() != self.task.marker:
            raise PermanentError(f"domain {self.name} exists but task {self.task.task_id} did not create it")
        else:
            progress(10, f"{self.name} exists from an earlier run of this task; finishing it")

        if not self.has_snapshot():
            progress(40, f"taking snapshot {INITIAL_SNAPSHOT}")
            self.remote.call(["virsh", "snapshot-create-as", self.name, INITIAL_SNAPSHOT])
        self.start_domain(state)
        return {"instance": self.name, "state": "running", "snapshot": INITIAL_SNAPSHOT}

    def set_resources(self, memory: int | None, cores: int | None) -> None:
        if memory is not None:
            self.remote.call(["virsh", "setmaxmem", self.name, f"{memory}MiB", "--config"])
            self.remote.call(["virsh", "setmem", self.name, f"{memory}MiB", "--config"])
        if cores is not None:
            self.remote.call(["virsh", "setvcpus", self.name, str(cores), "--config", "--maximum"])
            self.remote.call(["virsh", "setvcpus", self.name, str(cores), "--config"])

    def delete(self) -> dict:
        state = self.state()
        if state is None:
            return {"instance": self.name, "removed": False}
        if state != "shut off":
            progress(30, f"powering off {self.name}")
            self.remote.call(["virsh", "destroy", self.name])
        progress(60, f"removing {self.name} and its storage")
        self.remote.call(["virsh", "undefine", self.name, "--remove-all-storage", "--snapshots-metadata", "--nvram"])
        return {"instance": self.name, "removed": True}

    def reset(self) -> dict:
        state = self.existing_state()
        if not self.has_snapshot():
            raise PermanentError(
                f"domain {self.name} has no snapshot {INITIAL_SNAPSHOT} to reset to: take one, or create it again"
            )
        if state != "shut off":
            progress(20, f"powering off {self.name}")
            self.remote.call(["virsh", "destroy", self.name])
        progress(40, f"reverting to {INITIAL_SNAPSHOT}")
        self.remote.call(["virsh", "snapshot-revert", self.name, INITIAL_SNAPSHOT])
        self.start_domain("shut off")
        return {"instance": self.name, "state": "running"}

    def reset_password(self) -> dict:
        username, line = password_line(self.task.data)
        if self.existing_state() != "running":
            raise PermanentError(f"domain {self.name} is not running: start it before resetting a password")
        progress(40, f"setting the password of {username}")
        # set-user-password takes the password as an argument. Typed into virsh's own
        # shell on stdin, it stays out of every command line on both hosts.
        password = line.rstrip("\n").split(":", 1)[1]
        command = " ".join(virsh_quote(part) for part in ("set-user-password", self.name, username, password))
        completed = self.remote.run(["virsh", "-q"], input_text=command + "\n")
        # In its shell virsh reports a failed command on stderr, whatever its exit status.
        if completed.returncode != 0 or "error:" in completed.stderr:
            raise HostError(
                f"set-user-password for {username} in {self.name} on {self.remote.host} failed: "
                f"{completed.stderr.strip()[-2000:] or f'exit status {completed.returncode}'}"
            )
        return {"instance": self.name, "username": username}

    # -- probe -------------------------------------------------------------------------

    def probe(self) -> dict:
        state = self.state()
        if self.task.type == "delete":
            if state is None:
                return {"outcome": "completed", "result": {"instance": self.name, "removed": True}}
            return {"outcome": "not_done"}
        if self.task.type != "create" or state is None:
            return {"outcome": "not_done"}
        if self.description() != self.task.marker:
            return {"outcome": "failed", "error": f"domain {self.name} exists but task {self.task.task_id} did not create it"}
        if state == "running" and self.has_snapshot():
            return {"outcome": "completed", "result": {"instance": self.name, "state": "running", "snapshot": INITIAL_SNAPSHOT}}
        return {"outcome": "not_done"}


if __name__ == "__main__":
    main(LibvirtBackend)
