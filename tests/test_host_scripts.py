"""The example host scripts in examples/hosts/, run against local stand-ins for the hosts.

tests/fake_hosts.py replaces ssh, sudo, pct, qm, incus, virsh and virt-clone, first on
PATH. The fake ssh connects nowhere: like sshd, it hands the joined command
line to /bin/sh, so the remote shell's parsing of the scripts' quoting is real. Each
fake records its argv and stdin, which the tests compare with the tools' documented
command lines.
"""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from shared.errors import TaskFailed
from shared.settings import load_config
from worker.drivers import load_driver
from worker.drivers.base import TaskContext

ROOT = Path(__file__).resolve().parent.parent
HOSTS = ROOT / "examples" / "hosts"
FAKES = Path(__file__).with_name("fake_hosts.py")
FAKE_TOOLS = ("ssh", "sudo", "pct", "qm", "incus", "virsh", "virt-clone", "argv-recorder")
HOST_SCRIPTS = ("pve_host.py", "incus_host.py", "libvirt_host.py")
PROBE_SCRIPTS = ("pve_probe.py", "incus_probe.py", "libvirt_probe.py")
MARKER = "taskvisor-task=t-1"
SNAPSHOT = "taskvisor-initial"


@dataclass
class ScriptRun:
    returncode: int
    stdout: str
    stderr: str

    @property
    def progress(self) -> list[str]:
        return [line for line in self.stdout.splitlines() if line.startswith("progress ")]

    @property
    def result(self) -> dict | None:
        objects = [json.loads(line) for line in self.stdout.splitlines() if line.startswith("{")]
        return objects[-1] if objects else None


class FakeHosts:
    """A folder of fake tools first on PATH, their guests and their call log."""

    def __init__(self, tmp_path: Path) -> None:
        self.bin = tmp_path / "bin"
        self.bin.mkdir()
        # -S skips site-packages, which halves the start-up time of each of the many
        # short processes, and shows that the scripts need only the standard library.
        for tool in FAKE_TOOLS:
            self.write_wrapper(tool, f'exec {shlex.quote(sys.executable)} -S {shlex.quote(str(FAKES))} {tool} "$@"')
        # The scripts start with `#!/usr/bin/env python3`.
        self.write_wrapper("python3", f'exec {shlex.quote(sys.executable)} -S "$@"')
        self.log_path = tmp_path / "calls.jsonl"
        self.log_path.touch()
        self.state_path = tmp_path / "state.json"
        self.canary = tmp_path / "canary"
        self.set_state({})
        self.env = {
            **os.environ,
            "PATH": f"{self.bin}{os.pathsep}{os.environ['PATH']}",
            "FAKE_HOST_LOG": str(self.log_path),
            "FAKE_HOST_STATE": str(self.state_path),
            "PVE_HOST": "pve1.test.invalid",
            "PVE_USER": "taskvisor",
            "INCUS_HOST": "incus1.test.invalid",
            "LIBVIRT_HOST": "kvm1.test.invalid",
        }
        assert shutil.which("ssh", path=self.env["PATH"]) == str(self.bin / "ssh"), "the fake ssh must come first"

    def write_wrapper(self, name: str, command: str) -> None:
        path = self.bin / name
        path.write_text(f"#!/bin/sh\n{command}\n")
        path.chmod(0o755)

    def set_state(self, state: dict) -> None:
        self.state_path.write_text(json.dumps(state))

    def state(self) -> dict:
        return json.loads(self.state_path.read_text())

    def calls(self, tool: str | None = None) -> list[dict]:
        entries = [json.loads(line) for line in self.log_path.read_text().splitlines()]
        return [entry for entry in entries if tool is None or entry["tool"] == tool]

    def remote_argvs(self) -> list[list[str]]:
        """Return each command line that ssh carried, split as the remote shell splits it."""
        return [shlex.split(call["remote"]) for call in self.calls("ssh")]

    def run(self, script: str, task_type: str, instance: str, data: dict | None = None, timeout: float = 300,
            task_id: str = "t-1", **env: str) -> ScriptRun:
        task = {"id": task_id, "provider": "p", "type": task_type, "instance": instance, "user": "17",
                "timeout": timeout, "data": data or {}}
        completed = subprocess.run(
            [str(HOSTS / script), task_type, instance, task_id],
            input=json.dumps(task) + "\n", env={**self.env, **env}, capture_output=True, text=True, timeout=60,
        )
        return ScriptRun(completed.returncode, completed.stdout, completed.stderr)


@pytest.fixture
def hosts(tmp_path: Path) -> FakeHosts:
    return FakeHosts(tmp_path)


def assert_permanent_failure(run: ScriptRun, message: str) -> None:
    assert run.returncode == 2, run.stderr
    assert run.result == {"retry": False}
    assert message in run.stderr


# -- Proxmox VE ---------------------------------------------------------------------------


def test_pve_power_commands(hosts: FakeHosts) -> None:
    hosts.set_state({"pct": {"101": {"status": "stopped", "description": "", "snapshots": []}}})

    started = hosts.run("pve_host.py", "start", "ct-101")
    assert started.returncode == 0, started.stderr
    assert started.result == {"instance": "ct-101", "state": "running"}
    assert started.progress == ["progress 60 starting ct-101", "progress 100 done"]
    assert hosts.remote_argvs() == [["pct", "status", "101"], ["pct", "start", "101"]]

    ssh_argv = hosts.calls("ssh")[0]["argv"]
    assert ssh_argv[:2] == ["-o", "BatchMode=yes"]
    assert ssh_argv[-3:-1] == ["--", "pve1.test.invalid"]
    assert ssh_argv[ssh_argv.index("-l") + 1] == "taskvisor"

    stopped = hosts.run("pve_host.py", "stop", "ct-101", timeout=300)
    assert stopped.result == {"instance": "ct-101", "state": "stopped"}
    assert hosts.remote_argvs()[-1] == ["pct", "shutdown", "101", "--timeout", "60", "--forceStop", "1"]

    # The graceful part of a stop takes at most half the task's timeout.
    hosts.run("pve_host.py", "start", "ct-101")
    short = hosts.run("pve_host.py", "restart", "ct-101", timeout=40)
    assert short.result == {"instance": "ct-101", "state": "running"}
    assert hosts.remote_argvs()[-3:] == [
        ["pct", "status", "101"],
        ["pct", "shutdown", "101", "--timeout", "20", "--forceStop", "1"],
        ["pct", "start", "101"],
    ]
    assert hosts.state()["pct"]["101"]["status"] == "running"


def test_pve_create_container(hosts: FakeHosts) -> None:
    data = {"template": "local:vztmpl/debian-12-standard_12.7-1_amd64.tar.zst", "memory": 2048, "cores": 2, "disk": 20}
    run = hosts.run("pve_host.py", "create", "ct-105", data, PVE_STORAGE="local-zfs")

    assert run.returncode == 0, run.stderr
    assert run.result == {"instance": "ct-105", "state": "running", "snapshot": SNAPSHOT}
    assert hosts.remote_argvs() == [
        ["pct", "status", "105"],
        ["pct", "create", "105", data["template"], "--hostname", "ct-105", "--memory", "2048", "--cores", "2",
         "--rootfs", "local-zfs:20", "--net0", "name=eth0,bridge=vmbr0,ip=dhcp", "--unprivileged", "1",
         "--description", MARKER],
        ["pct", "listsnapshot", "105"],
        ["pct", "snapshot", "105", SNAPSHOT],
        ["pct", "start", "105"],
    ]
    assert hosts.state()["pct"]["105"] == {"status": "running", "description": MARKER, "snapshots": [SNAPSHOT]}


def test_pve_create_vm_by_clone(hosts: FakeHosts) -> None:
    hosts.set_state({"qm": {"9000": {"status": "stopped", "description": "template", "snapshots": []}}})
    run = hosts.run("pve_host.py", "create", "vm-120", {"template": "9000", "hostname": "web-1", "cores": 4})

    assert run.returncode == 0, run.stderr
    assert hosts.remote_argvs()[1:] == [
        ["qm", "clone", "9000", "120", "--name", "web-1", "--full", "1", "--description", MARKER],
        ["qm", "set", "120", "--memory", "1024", "--cores", "4"],
        ["qm", "listsnapshot", "120"],
        ["qm", "snapshot", "120", SNAPSHOT],
        ["qm", "start", "120"],
    ]


def test_pve_create_finishes_or_refuses_existing(hosts: FakeHosts) -> None:
    template = {"template": "local:vztmpl/debian-12.tar.zst"}
    hosts.set_state({"pct": {
        "105": {"status": "stopped", "description": MARKER, "snapshots": []},
        "106": {"status": "running", "description": "customer database", "snapshots": []},
    }})  # fmt: skip

    finished = hosts.run("pve_host.py", "create", "ct-105", template)
    assert finished.returncode == 0, finished.stderr
    commands = [argv[1] for argv in hosts.remote_argvs()]
    assert "create" not in commands
    assert commands[-2:] == ["snapshot", "start"]

    foreign = hosts.run("pve_host.py", "create", "ct-106", template)
    assert_permanent_failure(foreign, "ct-106 exists but task t-1 did not create it")
    assert hosts.state()["pct"]["106"]["description"] == "customer database"


def test_pve_delete_reset_and_missing(hosts: FakeHosts) -> None:
    hosts.set_state({"qm": {"130": {"status": "running", "description": "", "snapshots": [SNAPSHOT]}}})

    reset = hosts.run("pve_host.py", "reset", "vm-130")
    assert reset.result == {"instance": "vm-130", "state": "running"}
    assert hosts.remote_argvs()[-3:] == [["qm", "stop", "130"], ["qm", "rollback", "130", SNAPSHOT], ["qm", "start", "130"]]

    deleted = hosts.run("pve_host.py", "delete", "vm-130")
    assert deleted.result == {"instance": "vm-130", "removed": True}
    assert hosts.remote_argvs()[-2:] == [["qm", "stop", "130"], ["qm", "destroy", "130", "--purge", "1"]]

    again = hosts.run("pve_host.py", "delete", "vm-130")
    assert again.returncode == 0
    assert again.result == {"instance": "vm-130", "removed": False}

    missing = hosts.run("pve_host.py", "start", "vm-130")
    assert_permanent_failure(missing, "vm-130 does not exist on pve1.test.invalid")


def test_pve_reset_without_snapshot(hosts: FakeHosts) -> None:
    hosts.set_state({"pct": {"101": {"status": "running", "description": "", "snapshots": []}}})
    run = hosts.run("pve_host.py", "reset", "ct-101")
    assert_permanent_failure(run, f"ct-101 has no snapshot {SNAPSHOT} to reset to")
    assert hosts.state()["pct"]["101"]["status"] == "running"


def test_pve_password_only_on_stdin(hosts: FakeHosts) -> None:
    password = "n3w 'Secret' $(touch canary)"
    hosts.set_state({
        "pct": {"101": {"status": "running", "description": "", "snapshots": []}},
        "qm": {"120": {"status": "running", "description": "", "snapshots": []}},
    })  # fmt: skip

    container = hosts.run("pve_host.py", "reset-password", "ct-101", {"username": "admin", "password": password})
    vm = hosts.run("pve_host.py", "reset-password", "vm-120", {"password": password})

    assert container.result == {"instance": "ct-101", "username": "admin"}
    assert vm.result == {"instance": "vm-120", "username": "root"}
    assert hosts.calls("pct")[-1]["argv"] == ["exec", "101", "--", "chpasswd"]
    assert hosts.calls("pct")[-1]["stdin"] == f"admin:{password}\n"
    assert hosts.calls("qm")[-1]["argv"] == ["guest", "exec", "120", "--pass-stdin", "1", "--", "chpasswd"]
    assert hosts.calls("qm")[-1]["stdin"] == f"root:{password}\n"
    for call in hosts.calls():
        assert not any("Secret" in argument for argument in call["argv"]), call
        assert "Secret" not in call.get("remote", "")
    assert "Secret" not in container.stdout + container.stderr


def test_pve_backend_and_ssh_failures(hosts: FakeHosts) -> None:
    hosts.set_state({"pct": {"101": {"status": "stopped", "description": "", "snapshots": []}}})

    failed = hosts.run("pve_host.py", "start", "ct-101", FAKE_HOST_FAIL="pct start")
    assert failed.returncode == 1
    assert failed.result is None, "a failure a retry may fix must not print retry: false"
    assert "`pct start 101` on pve1.test.invalid failed with exit status 255" in failed.stderr
    assert "storage 'local-lvm' is not online" in failed.stderr

    refused = hosts.run("pve_host.py", "start", "ct-101", FAKE_SSH_REFUSE="1")
    assert refused.returncode == 1
    assert "Connection refused" in refused.stderr

    no_host = hosts.run("pve_host.py", "start", "ct-101", PVE_HOST="")
    assert_permanent_failure(no_host, "PVE_HOST is not set")

    connections = len(hosts.calls("ssh"))
    option_host = hosts.run("pve_host.py", "start", "ct-101", PVE_HOST=f"-oProxyCommand=touch {hosts.canary}")
    assert_permanent_failure(option_host, "invalid value of PVE_HOST")
    assert len(hosts.calls("ssh")) == connections
    assert not hosts.canary.exists()


def test_pve_probe_answers(hosts: FakeHosts) -> None:
    hosts.set_state({"pct": {
        "101": {"status": "running", "description": MARKER, "snapshots": [SNAPSHOT]},
        "102": {"status": "stopped", "description": MARKER, "snapshots": []},
        "103": {"status": "running", "description": "taskvisor-task=t-0", "snapshots": [SNAPSHOT]},
    }})  # fmt: skip

    def answer(task_type: str, instance: str) -> dict:
        run = hosts.run("pve_probe.py", task_type, instance)
        assert run.returncode == 0, run.stderr
        return run.result

    assert answer("create", "ct-101") == {
        "outcome": "completed",
        "result": {"instance": "ct-101", "state": "running", "snapshot": SNAPSHOT},
    }
    assert answer("create", "ct-102") == {"outcome": "not_done"}
    assert answer("create", "ct-103") == {"outcome": "failed", "error": "ct-103 exists but task t-1 did not create it"}
    assert answer("create", "ct-104") == {"outcome": "not_done"}
    assert answer("delete", "ct-101") == {"outcome": "not_done"}
    assert answer("delete", "ct-104") == {"outcome": "completed", "result": {"instance": "ct-104", "removed": True}}
    assert answer("reset", "ct-101") == {"outcome": "not_done"}
    # A probe changes nothing on the host.
    assert all(argv[1] in ("status", "config", "listsnapshot") for argv in hosts.remote_argvs())

    unreachable = hosts.run("pve_probe.py", "create", "ct-101", FAKE_SSH_REFUSE="1")
    assert unreachable.returncode == 1
    assert "probe failed" in unreachable.stderr


# -- Incus --------------------------------------------------------------------------------


def test_incus_create_and_power(hosts: FakeHosts) -> None:
    hosts.set_state({"incus": {"web10": {"status": "Running", "config": {}, "snapshots": []}}})
    data = {"image": "images:debian/12", "type": "vm", "memory": 2048, "cores": 2, "profile": "default"}

    created = hosts.run("incus_host.py", "create", "web1", data)
    assert created.returncode == 0, created.stderr
    assert created.result == {"instance": "web1", "state": "running", "snapshot": SNAPSHOT}
    assert hosts.remote_argvs() == [
        ["incus", "list", "web1", "--format", "json"],
        ["incus", "create", "images:debian/12", "web1", "--config", "user.taskvisor.task=t-1",
         "--config", "limits.memory=2048MiB", "--config", "limits.cpu=2", "--profile", "default", "--vm"],
        ["incus", "snapshot", "list", "web1", "--format", "csv", "--columns", "n"],
        ["incus", "snapshot", "create", "web1", SNAPSHOT],
        ["incus", "start", "web1"],
    ]
    # incus create reads a config from stdin when stdin is not a terminal.
    assert all(call["stdin"] == "" for call in hosts.calls("incus"))

    # web1 must not be confused with web10, which `incus list web1` also returns.
    stopped = hosts.run("incus_host.py", "stop", "web1")
    assert stopped.result == {"instance": "web1", "state": "stopped"}
    assert hosts.remote_argvs()[-1] == ["incus", "stop", "web1", "--timeout", "60"]
    assert hosts.state()["incus"]["web10"]["status"] == "Running"


def test_incus_forced_stop_reset_and_delete(hosts: FakeHosts) -> None:
    hosts.set_state({"incus": {"db1": {"status": "Running", "config": {}, "snapshots": [SNAPSHOT],
                                       "ignore_shutdown": True}}})

    stopped = hosts.run("incus_host.py", "stop", "db1", timeout=30)
    assert stopped.returncode == 0, stopped.stderr
    assert hosts.remote_argvs()[-2:] == [["incus", "stop", "db1", "--timeout", "15"], ["incus", "stop", "db1", "--force"]]
    assert "progress 50 db1 did not stop within 15 s; forcing it" in stopped.progress

    reset = hosts.run("incus_host.py", "reset", "db1")
    assert reset.result == {"instance": "db1", "state": "running"}
    assert hosts.remote_argvs()[-2:] == [["incus", "snapshot", "restore", "db1", SNAPSHOT], ["incus", "start", "db1"]]

    password = hosts.run("incus_host.py", "reset-password", "db1", {"password": "p:w d"})
    assert password.result == {"instance": "db1", "username": "root"}
    assert hosts.calls("incus")[-1]["argv"] == ["exec", "db1", "--", "chpasswd"]
    assert hosts.calls("incus")[-1]["stdin"] == "root:p:w d\n"

    deleted = hosts.run("incus_host.py", "delete", "db1")
    assert deleted.result == {"instance": "db1", "removed": True}
    assert hosts.remote_argvs()[-1] == ["incus", "delete", "db1", "--force"]
    assert hosts.state()["incus"] == {}


def test_incus_invalid_data_and_probe(hosts: FakeHosts) -> None:
    unknown = hosts.run("incus_host.py", "create", "web1", {"image": "images:debian/12", "memroy": 512})
    assert_permanent_failure(unknown, "unknown field data.memroy")

    image = hosts.run("incus_host.py", "create", "web1", {"image": "--target=other"})
    assert_permanent_failure(image, "invalid data.image")
    assert hosts.calls("ssh") == []

    hosts.set_state({"incus": {"web1": {"status": "Running", "config": {"user.taskvisor.task": "t-1"},
                                        "snapshots": [SNAPSHOT]}}})
    completed = hosts.run("incus_probe.py", "create", "web1")
    assert completed.result["outcome"] == "completed"
    foreign = hosts.run("incus_probe.py", "create", "web1", task_id="t-2")
    assert foreign.result == {"outcome": "failed", "error": "instance web1 exists but task t-2 did not create it"}
    gone = hosts.run("incus_probe.py", "delete", "web2")
    assert gone.result == {"outcome": "completed", "result": {"instance": "web2", "removed": True}}


# -- libvirt ------------------------------------------------------------------------------


def test_libvirt_create_by_clone(hosts: FakeHosts) -> None:
    hosts.set_state({"virsh": {"debian12-base": {"state": "shut off", "description": "", "snapshots": []}}})
    run = hosts.run("libvirt_host.py", "create", "vm-7", {"template": "debian12-base", "memory": 4096, "cores": 2})

    assert run.returncode == 0, run.stderr
    assert hosts.remote_argvs() == [
        ["virsh", "domstate", "vm-7"],
        ["virt-clone", "--original", "debian12-base", "--name", "vm-7", "--auto-clone"],
        ["virsh", "desc", "vm-7", "--config", "--new-desc", MARKER],
        ["virsh", "setmaxmem", "vm-7", "4096MiB", "--config"],
        ["virsh", "setmem", "vm-7", "4096MiB", "--config"],
        ["virsh", "setvcpus", "vm-7", "2", "--config", "--maximum"],
        ["virsh", "setvcpus", "vm-7", "2", "--config"],
        ["virsh", "snapshot-list", "vm-7", "--name"],
        ["virsh", "snapshot-create-as", "vm-7", SNAPSHOT],
        ["virsh", "start", "vm-7"],
    ]

    probe = hosts.run("libvirt_probe.py", "create", "vm-7")
    assert probe.result == {"outcome": "completed", "result": {"instance": "vm-7", "state": "running", "snapshot": SNAPSHOT}}


def test_libvirt_stop_powers_off_after_timeout(hosts: FakeHosts) -> None:
    hosts.set_state({"virsh": {"vm-7": {"state": "running", "description": "", "snapshots": [], "ignore_shutdown": True}}})
    run = hosts.run("libvirt_host.py", "stop", "vm-7", timeout=2)

    assert run.returncode == 0, run.stderr
    assert run.result == {"instance": "vm-7", "state": "stopped"}
    commands = [argv[1] for argv in hosts.remote_argvs()]
    assert commands[:2] == ["domstate", "shutdown"]
    assert commands[-1] == "destroy"
    assert "progress 50 vm-7 did not shut down within 1 s; powering it off" in run.progress
    assert hosts.state()["virsh"]["vm-7"]["state"] == "shut off"


def test_libvirt_password_through_virsh_shell(hosts: FakeHosts) -> None:
    hosts.set_state({"virsh": {"vm-7": {"state": "running", "description": "", "snapshots": []}}})
    password = f"it's \"x\" $(touch {hosts.canary}); reboot"
    run = hosts.run("libvirt_host.py", "reset-password", "vm-7", {"username": "debian", "password": password})

    assert run.returncode == 0, run.stderr
    assert hosts.remote_argvs()[-1] == ["virsh", "-q"]
    assert hosts.calls("virsh-shell") == [
        {"tool": "virsh-shell", "argv": ["set-user-password", "vm-7", "debian", password], "stdin": ""}
    ]
    assert not any("touch" in argument for call in hosts.calls("ssh") for argument in call["argv"])
    assert not hosts.canary.exists()

    stopped = hosts.run("libvirt_host.py", "reset-password", "vm-8", {"password": "x"})
    assert_permanent_failure(stopped, "domain vm-8 does not exist")
    newline = hosts.run("libvirt_host.py", "reset-password", "vm-7", {"password": "a\nb"})
    assert_permanent_failure(newline, "without line breaks")


# -- hostile input ------------------------------------------------------------------------

HOSTILE_INSTANCES = [
    "vm-1; rm -rf /",
    "-rf",
    "--help",
    "ct-101 --purge",
    "$(touch CANARY)",
    "`touch CANARY`",
    "ct-101\ntouch CANARY",
    "remote:web1",
    "web1/snap0",
]


@pytest.mark.parametrize("script", HOST_SCRIPTS + PROBE_SCRIPTS)
def test_hostile_instance_rejected(hosts: FakeHosts, script: str) -> None:
    # A probe builds the same backend as its host script, so a few ids show that it checks them too.
    instances = HOSTILE_INSTANCES if script in HOST_SCRIPTS else HOSTILE_INSTANCES[:3]
    for instance in instances:
        instance = instance.replace("CANARY", str(hosts.canary))
        run = hosts.run(script, "start", instance)
        assert run.returncode == (2 if script in HOST_SCRIPTS else 1), (instance, run.stderr)
        assert "invalid instance id" in run.stderr, (instance, run.stderr)
    assert hosts.calls() == [], "no command may reach a host for an invalid instance id"
    assert not hosts.canary.exists()


def test_invalid_arguments_rejected(hosts: FakeHosts) -> None:
    wrong_type = hosts.run("pve_host.py", "reboot", "ct-101")
    assert_permanent_failure(wrong_type, "unknown task type 'reboot'")
    wrong_id = hosts.run("pve_host.py", "start", "ct-101", task_id="t 1; ls")
    assert_permanent_failure(wrong_id, "invalid task id")
    no_instance = hosts.run("incus_host.py", "create", "", {"image": "images:debian/12"})
    assert_permanent_failure(no_instance, "has no instance id")
    assert hosts.calls() == []


def test_remote_quoting_keeps_arguments(hosts: FakeHosts, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(HOSTS))
    import hostlib

    canary = str(hosts.canary)
    arguments = [
        "vm-1; rm -rf /",
        f"$(touch {canary})",
        f"`touch {canary}`",
        f"x' ; touch {canary}; echo '",
        "-rf",
        "two words",
        "*",
        "line\nbreak",
        "",
        "$HOME ~ \\ \" !",
    ]
    remote = hostlib.Remote("PVE", hosts.env)
    monkeypatch.setenv("PATH", hosts.env["PATH"])
    monkeypatch.setenv("FAKE_HOST_LOG", hosts.env["FAKE_HOST_LOG"])
    completed = remote.run(["argv-recorder", *arguments])

    assert completed.returncode == 0, completed.stderr
    assert hosts.calls("argv-recorder")[0]["argv"] == arguments
    assert not hosts.canary.exists()


def test_ssh_guard_runs_only_allowed_programs(hosts: FakeHosts) -> None:
    hosts.set_state({"pct": {"101": {"status": "stopped", "description": "", "snapshots": []}}})
    guard = f"{sys.executable} {HOSTS / 'ssh_guard.py'} pct qm"

    run = hosts.run("pve_host.py", "start", "ct-101", FAKE_SSH_FORCED_COMMAND=guard, PVE_SUDO="")
    assert run.returncode == 0, run.stderr
    assert [call["argv"] for call in hosts.calls("pct")] == [["status", "101"], ["start", "101"]]

    def guarded(command_line: str) -> subprocess.CompletedProcess:
        env = {**hosts.env, "SSH_ORIGINAL_COMMAND": command_line}
        return subprocess.run([sys.executable, str(HOSTS / "ssh_guard.py"), "pct", "qm"], env=env,
                              capture_output=True, text=True, check=False)

    for rejected in (f"touch {hosts.canary}", f"sudo -n -- touch {hosts.canary}", "", "pct 'unbalanced"):
        completed = guarded(rejected)
        assert completed.returncode == 126, rejected
        assert "taskvisor-ssh-guard: rejected" in completed.stderr
    # Shell syntax reaches pct as plain argument text.
    assert guarded(f"pct status 101; touch {hosts.canary}").returncode == 2
    assert hosts.calls("pct")[-1]["argv"] == ["status", "101;", "touch", str(hosts.canary)]
    assert not hosts.canary.exists()


# -- the documented configs through the command driver ------------------------------------


def real_host_configs() -> list[dict]:
    """Return the YAML configs of the "Real hosts" section of docs/drivers.md."""
    text = (ROOT / "docs" / "drivers.md").read_text()
    section = text.split("\n## Real hosts\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```yaml\n(.*?)```", section, re.DOTALL)
    return [yaml.safe_load(block) for block in blocks]


def test_documented_configs_run_through_command_driver(hosts: FakeHosts, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    configs = real_host_configs()
    assert [next(iter(config["providers"])) for config in configs] == ["pve-1", "incus-1", "kvm-1"]
    for name in ("PATH", "FAKE_HOST_LOG", "FAKE_HOST_STATE"):
        monkeypatch.setenv(name, hosts.env[name])
    hosts.set_state({
        "pct": {"101": {"status": "stopped", "description": "", "snapshots": []}},
        "incus": {"web1": {"status": "Stopped", "config": {}, "snapshots": []}},
        "virsh": {"vm-7": {"state": "shut off", "description": "", "snapshots": []}},
    })  # fmt: skip

    for config, instance in zip(configs, ("ct-101", "web1", "vm-7"), strict=True):
        provider, settings = next(iter(config["providers"].items()))
        assert settings["driver"]["workdir"] == "/opt/taskvisor/examples/hosts"
        settings["driver"]["workdir"] = str(HOSTS)
        path = tmp_path / f"{provider}.yaml"
        path.write_text(yaml.safe_dump(config))
        loaded = load_config(path)
        driver = load_driver(provider, loaded.providers[provider].driver, loaded.base_dir)

        reports: list[tuple[float, str]] = []

        def context(task_type: str, target: str, data: dict | None = None) -> TaskContext:
            return TaskContext(task_id="t-1", provider=provider, task_type=task_type, instance=target, user="17",
                               data=data or {}, timeout=120, kill_grace=5,
                               report_progress=lambda percent, message: reports.append((percent, message)))

        assert driver.start(context("start", instance)) == {"instance": instance, "state": "running"}
        assert reports[-1] == (100.0, "done")
        assert driver.has_probe("create")
        assert driver.probe(context("delete", instance)).outcome == "not_done"

        with pytest.raises(TaskFailed) as failure:
            driver.start(context("start", "missing-1" if provider != "pve-1" else "ct-999"))
        assert failure.value.result == {"retry": False}
        assert "exited with status 2" in str(failure.value)

    hosts_contacted = {call["host"] for call in hosts.calls("ssh")}
    assert hosts_contacted == {"pve1.example.internal", "incus1.example.internal", "kvm1.example.internal"}
