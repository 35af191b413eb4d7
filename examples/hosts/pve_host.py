#!/usr/bin/env python3
"""taskvisor command for a Proxmox VE node over SSH: `pct` for containers, `qm` for VMs.

Usage, as the provider's command for every task type:
    ["./pve_host.py", "{type}", "{instance}", "{id}"]

The instance id is `ct-<vmid>` for a container or `vm-<vmid>` for a VM, with a VMID
from 100 to 999999999. The SSH settings come from driver.env: PVE_HOST (required),
PVE_USER, PVE_PORT, PVE_IDENTITY, PVE_SUDO, PVE_CONNECT_TIMEOUT and PVE_STOP_TIMEOUT
(see hostlib.Remote). PVE_STORAGE (default local-lvm) and PVE_CT_NET (default
name=eth0,bridge=vmbr0,ip=dhcp) set the root disk storage and the network of new
containers.

create reads data.template (a container template volume such as
`local:vztmpl/debian-12-standard_12.7-1_amd64.tar.zst`, or the VMID of a VM template
to clone), and optionally data.hostname, data.memory (MiB), data.cores and, for
containers, data.disk (GiB) and data.storage. It marks the guest with the task id in
its description, takes the snapshot `taskvisor-initial` and starts the guest. A rerun
after an interruption finishes the steps that are missing. reset rolls back to that
snapshot. reset-password needs a running guest: containers through `pct exec`, VMs
through the QEMU guest agent.
"""

import json
import re
import urllib.parse

from hostlib import (
    HOSTNAME_PATTERN,
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

INSTANCE_PATTERN = re.compile(r"(ct|vm)-([1-9][0-9]{2,8})")
VMID_PATTERN = re.compile(r"[1-9][0-9]{2,8}")
# A container template volume id, such as local:vztmpl/debian-12-standard_12.7-1_amd64.tar.zst.
VOLUME_PATTERN = re.compile(r"[A-Za-z][A-Za-z0-9._-]*:[A-Za-z0-9][A-Za-z0-9._/+-]*")
STORAGE_PATTERN = re.compile(r"[A-Za-z][A-Za-z0-9._-]{0,63}")
CREATE_FIELDS = ("template", "hostname", "memory", "cores", "disk", "storage")


class ProxmoxBackend(Backend):
    env_prefix = "PVE"

    def __init__(self, task, remote, environ) -> None:
        super().__init__(task, remote, environ)
        match = INSTANCE_PATTERN.fullmatch(task.instance)
        if match is None:
            raise PermanentError(
                f"invalid instance id {task.instance!r}: expected ct-<vmid> for a container or vm-<vmid> for a VM, "
                f"with a VMID from 100 to 999999999"
            )
        kind, self.vmid = match.groups()
        self.is_container = kind == "ct"
        self.tool = "pct" if self.is_container else "qm"

    # -- reading the guest ---------------------------------------------------------------

    def status(self) -> str | None:
        """Return `running`, `stopped` or another status of the guest; None when it does not exist."""
        completed = self.remote.run([self.tool, "status", self.vmid])
        if completed.returncode != 0:
            if "does not exist" in completed.stderr:
                return None
            raise HostError(self.remote.failure([self.tool, "status", self.vmid], completed))
        for line in completed.stdout.splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "status":
                return value.strip()
        raise HostError(f"unexpected output of `{self.tool} status {self.vmid}`: {completed.stdout[:200]!r}")

    def existing_status(self) -> str:
        status = self.status()
        if status is None:
            raise PermanentError(f"{self.task.instance} does not exist on {self.remote.host}")
        return status

    def description(self) -> str:
        for line in self.remote.call([self.tool, "config", self.vmid]).splitlines():
            key, _, value = line.partition(":")
            if key == "description":
                # The guest's config file stores the description percent-encoded; unquoting
                # also matches output that shows it that way. Task ids contain no '%'.
                return urllib.parse.unquote(value.strip())
        return ""

    def has_snapshot(self) -> bool:
        listing = self.remote.call([self.tool, "listsnapshot", self.vmid])
        return any(INITIAL_SNAPSHOT in line.split() for line in listing.splitlines())

    # -- power -------------------------------------------------------------------------

    def start_guest(self, status: str) -> None:
        if status != "running":
            progress(60, f"starting {self.task.instance}")
            self.remote.call([self.tool, "start", self.vmid])

    def stop_guest(self, status: str) -> None:
        if status != "stopped":
            seconds = self.stop_timeout()
            progress(30, f"shutting down {self.task.instance}, forced after {seconds} s")
            self.remote.call([self.tool, "shutdown", self.vmid, "--timeout", str(seconds), "--forceStop", "1"])

    def start(self) -> dict:
        self.start_guest(self.existing_status())
        return {"instance": self.task.instance, "state": "running"}

    def stop(self) -> dict:
        self.stop_guest(self.existing_status())
        return {"instance": self.task.instance, "state": "stopped"}

    def restart(self) -> dict:
        # Shutdown and start rather than `reboot`, which fails when the guest ignores ACPI.
        self.stop_guest(self.existing_status())
        self.start_guest("stopped")
        return {"instance": self.task.instance, "state": "running"}

    # -- lifecycle ---------------------------------------------------------------------

    def create(self) -> dict:
        data = self.task.data
        check_known_fields(data, CREATE_FIELDS if self.is_container else CREATE_FIELDS[:4])
        template = text_field(data, "template", VOLUME_PATTERN if self.is_container else VMID_PATTERN)
        hostname = text_field(data, "hostname", HOSTNAME_PATTERN, default=self.task.instance)
        memory = integer_field(data, "memory", 1024, 16, 4 * 1024 * 1024)
        cores = integer_field(data, "cores", 1, 1, 512)

        status = self.status()
        if status is None:
            progress(10, f"creating {self.task.instance} from {template}")
            if self.is_container:
                self.create_container(template, hostname, memory, cores)
            else:
                self.create_vm(template, hostname, memory, cores)
            status = "stopped"
        elif self.description() != self.task.marker:
            raise PermanentError(f"{self.task.instance} exists but task {self.task.task_id} did not create it")
        else:
            progress(10, f"{self.task.instance} exists from an earlier run of this task; finishing it")

        if not self.has_snapshot():
            progress(40, f"taking snapshot {INITIAL_SNAPSHOT}")
            self.remote.call([self.tool, "snapshot", self.vmid, INITIAL_SNAPSHOT])
        self.start_guest(status)
        return {"instance": self.task.instance, "state": "running", "snapshot": INITIAL_SNAPSHOT}

    def create_container(self, template: str, hostname: str, memory: int, cores: int) -> None:
        storage = text_field(self.task.data, "storage", STORAGE_PATTERN, default=self.environ.get("PVE_STORAGE", "local-lvm"))
        disk = integer_field(self.task.data, "disk", 8, 1, 65536)
        network = self.environ.get("PVE_CT_NET", "name=eth0,bridge=vmbr0,ip=dhcp")
        self.remote.call([
            "pct", "create", self.vmid, template,
            "--hostname", hostname,
            "--memory", str(memory),
            "--cores", str(cores),
            "--rootfs", f"{storage}:{disk}",
            "--net0", network,
            "--unprivileged", "1",
            "--description", self.task.marker,
        ])  # fmt: skip

    def create_vm(self, template: str, hostname: str, memory: int, cores: int) -> None:
        # The description is set by the clone itself, so a guest never exists unmarked.
        self.remote.call([
            "qm", "clone", template, self.vmid, "--name", hostname, "--full", "1", "--description", self.task.marker,
        ])  # fmt: skip
        self.remote.call(["qm", "set", self.vmid, "--memory", str(memory), "--cores", str(cores)])

    def delete(self) -> dict:
        status = self.status()
        if status is None:
            return {"instance": self.task.instance, "removed": False}
        if status != "stopped":
            progress(30, f"stopping {self.task.instance}")
            self.remote.call([self.tool, "stop", self.vmid])
        progress(60, f"destroying {self.task.instance}")
        self.remote.call([self.tool, "destroy", self.vmid, "--purge", "1"])
        return {"instance": self.task.instance, "removed": True}

    def reset(self) -> dict:
        status = self.existing_status()
        if not self.has_snapshot():
            raise PermanentError(
                f"{self.task.instance} has no snapshot {INITIAL_SNAPSHOT} to reset to: take one, or create the instance again"
            )
        if status != "stopped":
            progress(20, f"stopping {self.task.instance}")
            self.remote.call([self.tool, "stop", self.vmid])
        progress(40, f"rolling back to {INITIAL_SNAPSHOT}")
        self.remote.call([self.tool, "rollback", self.vmid, INITIAL_SNAPSHOT])
        self.start_guest("stopped")
        return {"instance": self.task.instance, "state": "running"}

    def reset_password(self) -> dict:
        username, line = password_line(self.task.data)
        if self.existing_status() != "running":
            raise PermanentError(f"{self.task.instance} is not running: start it before resetting a password")
        progress(40, f"setting the password of {username}")
        # The password travels only on stdin, never in a command line.
        if self.is_container:
            self.remote.call(["pct", "exec", self.vmid, "--", "chpasswd"], input_text=line)
        else:
            self.set_vm_password(line)
        return {"instance": self.task.instance, "username": username}

    def set_vm_password(self, line: str) -> None:
        argv = ["qm", "guest", "exec", self.vmid, "--pass-stdin", "1", "--", "chpasswd"]
        output = self.remote.call(argv, input_text=line)
        try:
            outcome = json.loads(output)
        except ValueError:
            raise HostError(f"unexpected output of `{' '.join(argv)}`: {output[:200]!r}") from None
        if not outcome.get("exited") or outcome.get("exitcode") != 0:
            detail = str(outcome.get("err-data", "")).strip()[:500] or "no output"
            raise HostError(f"chpasswd in {self.task.instance} failed with exit code {outcome.get('exitcode')}: {detail}")

    # -- probe -------------------------------------------------------------------------

    def probe(self) -> dict:
        status = self.status()
        if self.task.type == "delete":
            if status is None:
                return {"outcome": "completed", "result": {"instance": self.task.instance, "removed": True}}
            return {"outcome": "not_done"}
        if self.task.type != "create" or status is None:
            return {"outcome": "not_done"}
        if self.description() != self.task.marker:
            return {"outcome": "failed", "error": f"{self.task.instance} exists but task {self.task.task_id} did not create it"}
        if status == "running" and self.has_snapshot():
            result = {"instance": self.task.instance, "state": "running", "snapshot": INITIAL_SNAPSHOT}
            return {"outcome": "completed", "result": result}
        # This task made the guest but stopped before the snapshot or the start: a rerun finishes it.
        return {"outcome": "not_done"}


if __name__ == "__main__":
    main(ProxmoxBackend)
