"""Local stand-ins for ssh, sudo, pct, qm, incus, virsh and virt-clone in the host script tests.

The tests put a wrapper per tool into a folder at the front of PATH, which runs
`fake_hosts.py TOOL ARGS...`. Every call appends {"tool", "argv", "stdin"} to the JSON-lines file $FAKE_HOST_LOG.
The guests live in the JSON file $FAKE_HOST_STATE, keyed by tool and guest id.
$FAKE_HOST_FAIL names one call, such as "pct start", that fails like the real tool.

The fake ssh contacts nothing: like sshd it hands the joined command line to
`/bin/sh -c`, which runs the fake tools from the same PATH, so the remote side's
shell parsing is real. The argv handling and output follow the tools' manuals
(pct(1), qm(1), the incus command reference, virsh(1), virt-clone(1)).
"""

import json
import os
import sys

NOT_FOUND_EXIT = 2
ERROR_EXIT = 255


def log(tool: str, argv: list[str], stdin: str = "", **extra) -> None:
    with open(os.environ["FAKE_HOST_LOG"], "a", encoding="utf-8") as file:
        file.write(json.dumps({"tool": tool, "argv": argv, "stdin": stdin, **extra}) + "\n")


def load_state() -> dict:
    with open(os.environ["FAKE_HOST_STATE"], encoding="utf-8") as file:
        return json.load(file)


def save_state(state: dict) -> None:
    with open(os.environ["FAKE_HOST_STATE"], "w", encoding="utf-8") as file:
        json.dump(state, file)


def fail(message: str, code: int = ERROR_EXIT) -> None:
    print(message, file=sys.stderr)
    sys.exit(code)


def option(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None


def injected_failure(tool: str, argv: list[str]) -> None:
    wanted = os.environ.get("FAKE_HOST_FAIL", "")
    call = " ".join([tool, *argv[:1]])
    if wanted and (call == wanted or " ".join([tool, *argv[:2]]) == wanted):
        fail(f"{call}: storage 'local-lvm' is not online")


def read_stdin() -> str:
    return "" if sys.stdin.isatty() else sys.stdin.read()


# -- ssh ---------------------------------------------------------------------------------

SSH_FLAGS_WITH_VALUE = {"-o", "-i", "-p", "-l", "-F", "-J", "-E", "-b", "-c", "-m"}


def fake_ssh(argv: list[str]) -> None:
    index = 0
    while index < len(argv) and argv[index].startswith("-") and argv[index] != "--":
        index += 2 if argv[index] in SSH_FLAGS_WITH_VALUE else 1
    if index < len(argv) and argv[index] == "--":
        index += 1
    host, remote = argv[index], " ".join(argv[index + 1:])
    log("ssh", argv, host=host, remote=remote)
    if os.environ.get("FAKE_SSH_REFUSE") == "1":
        fail(f"ssh: connect to host {host} port 22: Connection refused")
    forced = os.environ.get("FAKE_SSH_FORCED_COMMAND")
    if forced:
        # A command= option in authorized_keys: sshd runs it instead, with the client's
        # command line in SSH_ORIGINAL_COMMAND.
        environment = {**os.environ, "SSH_ORIGINAL_COMMAND": remote}
        os.execve("/bin/sh", ["/bin/sh", "-c", forced], environment)
    # sshd runs the command line through the remote user's shell.
    os.execv("/bin/sh", ["/bin/sh", "-c", remote])


# -- Proxmox VE: pct and qm -----------------------------------------------------------------

def fake_proxmox(tool: str, argv: list[str]) -> None:
    stdin = read_stdin() if argv[:1] == ["exec"] or argv[:2] == ["guest", "exec"] else ""
    log(tool, argv, stdin)
    injected_failure(tool, argv)
    state = load_state()
    guests = state.setdefault(tool, {})
    noun, folder = ("CT", "lxc") if tool == "pct" else ("VM", "qemu-server")
    command = argv[0]
    if command == "guest":
        command, argv = "guest " + argv[1], argv[1:]
    vmid = argv[1] if len(argv) > 1 else ""

    if command in ("create", "clone"):
        new_id = argv[1] if command == "create" else argv[2]
        if command == "clone" and vmid not in guests:
            fail(f"Configuration file 'nodes/pve/{folder}/{vmid}.conf' does not exist")
        if new_id in guests:
            fail(f"unable to create {noun} {new_id} - {noun} {new_id} already exists on node 'pve'")
        guests[new_id] = {"status": "stopped", "description": option(argv, "--description") or "", "snapshots": []}
        save_state(state)
        return
    guest = guests.get(vmid)
    if guest is None:
        fail(f"Configuration file 'nodes/pve/{folder}/{vmid}.conf' does not exist", NOT_FOUND_EXIT)

    if command == "status":
        print(f"status: {guest['status']}")
    elif command == "config":
        print(f"arch: amd64\ndescription: {guest['description']}\nmemory: 1024")
    elif command == "listsnapshot":
        for name in guest["snapshots"]:
            print(f"`-> {name}                 2026-12-04 10:00:00     no-description")
        print("    `-> current                                   You are here!")
    elif command == "start":
        if guest["status"] == "running":
            fail(f"{noun} {vmid} already running")
        guest["status"] = "running"
    elif command in ("shutdown", "stop"):
        if guest["status"] != "running":
            fail(f"{noun} {vmid} not running")
        guest["status"] = "stopped"
    elif command == "destroy":
        if guest["status"] == "running":
            fail(f"{noun} {vmid} is running - destroy failed")
        del guests[vmid]
    elif command == "snapshot":
        guest["snapshots"].append(argv[2])
    elif command == "rollback":
        if argv[2] not in guest["snapshots"]:
            fail(f"snapshot '{argv[2]}' does not exist")
        if guest["status"] == "running" and tool == "pct":
            fail(f"unable to rollback {noun} {vmid}: {noun} is running")
    elif command == "set":
        pass
    elif command == "exec":
        if guest["status"] != "running":
            fail(f"{noun} {vmid} not running")
    elif command == "guest exec":
        if guest["status"] != "running":
            fail(f"VM {vmid} is not running")
        print(json.dumps({"exitcode": 0, "exited": 1}))
    else:
        fail(f"400 unknown command '{tool} {command}'")
    save_state(state)


# -- Incus ------------------------------------------------------------------------------------

def fake_incus(argv: list[str]) -> None:
    stdin = read_stdin()
    log("incus", argv, stdin)
    injected_failure("incus", argv)
    state = load_state()
    instances = state.setdefault("incus", {})
    command = argv[0]
    if command == "snapshot":
        command, argv = "snapshot " + argv[1], argv[1:]
    name = argv[1] if len(argv) > 1 else ""

    if command == "list":
        # A plain filter matches every instance whose name starts with it.
        found = [{"name": key, **value} for key, value in sorted(instances.items()) if key.startswith(name)]
        print(json.dumps(found))
        return
    if command == "create":
        name = argv[2]
        if stdin:
            fail("Error: Failed to parse the instance config on stdin")
        if name in instances:
            fail("Error: Failed creating instance record: Instance is busy running a create operation", 1)
        config = dict(value.split("=", 1) for value in [argv[i + 1] for i, a in enumerate(argv) if a == "--config"])
        instances[name] = {"status": "Stopped", "config": config, "snapshots": []}
        save_state(state)
        return
    instance = instances.get(name)
    if instance is None:
        fail("Error: Instance not found", 1)

    if command == "start":
        if instance["status"] == "Running":
            fail("Error: The instance is already running", 1)
        instance["status"] = "Running"
    elif command == "stop":
        if instance["status"] != "Running":
            fail("Error: The instance is already stopped", 1)
        if instance.get("ignore_shutdown") and "--force" not in argv:
            fail("Error: Failed shutting down instance, status is \"Running\": context deadline exceeded", 1)
        instance["status"] = "Stopped"
    elif command == "delete":
        if instance["status"] == "Running" and "--force" not in argv:
            fail("Error: The instance is currently running, stop it first or pass --force", 1)
        del instances[name]
    elif command == "snapshot create":
        instance["snapshots"].append(argv[2])
    elif command == "snapshot list":
        print("\n".join(instance["snapshots"]))
    elif command == "snapshot restore":
        if argv[2] not in instance["snapshots"]:
            fail("Error: Instance snapshot not found", 1)
    elif command == "exec":
        if instance["status"] != "Running":
            fail("Error: Instance is not running", 1)
    else:
        fail(f"Error: unknown command \"{command}\" for \"incus\"", 1)
    save_state(state)


# -- libvirt: virsh and virt-clone ------------------------------------------------------------

def virsh_command(domains: dict, argv: list[str]) -> None:
    command = argv[0]
    name = argv[1] if len(argv) > 1 else ""
    domain = domains.get(name)
    if domain is None:
        fail(f"error: failed to get domain '{name}'", 1)

    if command == "domstate":
        print(domain["state"] + "\n")
    elif command == "desc":
        if "--new-desc" in argv:
            domain["description"] = option(argv, "--new-desc")
            print("Domain description updated successfully")
        else:
            print(domain["description"] or f"No description for domain: {name}")
    elif command == "start":
        if domain["state"] == "running":
            fail("error: Domain is already active", 1)
        domain["state"] = "running"
    elif command == "shutdown":
        if domain["state"] != "running":
            fail("error: Requested operation is not valid: domain is not running", 1)
        if not domain.get("ignore_shutdown"):
            domain["state"] = "shut off"
        print(f"Domain '{name}' is being shutdown")
    elif command == "destroy":
        if domain["state"] != "running":
            fail("error: Requested operation is not valid: domain is not running", 1)
        domain["state"] = "shut off"
        print(f"Domain '{name}' destroyed")
    elif command == "undefine":
        del domains[name]
    elif command == "snapshot-create-as":
        domain["snapshots"].append(argv[2])
    elif command == "snapshot-list":
        print("\n".join(domain["snapshots"]))
    elif command == "snapshot-revert":
        if argv[2] not in domain["snapshots"]:
            fail(f"error: Domain snapshot not found: no domain snapshot with matching name '{argv[2]}'", 1)
    elif command in ("setmaxmem", "setmem", "setvcpus"):
        pass
    elif command == "set-user-password":
        if domain["state"] != "running":
            fail("error: Requested operation is not valid: domain is not running", 1)
        print(f"Password set successfully for {argv[2]} in {name}")
    else:
        fail(f"error: unknown command: '{command}'", 1)


def fake_virsh(argv: list[str]) -> None:
    options = [argument for argument in argv if argument == "-q"]
    command = argv[len(options):]
    stdin = read_stdin() if not command else ""
    log("virsh", argv, stdin)
    state = load_state()
    domains = state.setdefault("virsh", {})
    if command:
        injected_failure("virsh", command)
        virsh_command(domains, command)
    else:
        # Without a command virsh reads commands from stdin, one per line, and splits
        # each line with shell-like quoting.
        import shlex

        for line in stdin.splitlines():
            words = shlex.split(line)
            log("virsh-shell", words)
            virsh_command(domains, words)
    save_state(state)


def fake_virt_clone(argv: list[str]) -> None:
    log("virt-clone", argv)
    injected_failure("virt-clone", argv)
    state = load_state()
    domains = state.setdefault("virsh", {})
    original, name = option(argv, "--original"), option(argv, "--name")
    if original not in domains:
        fail(f"ERROR    Domain '{original}' was not found.", 1)
    if name in domains:
        fail(f"ERROR    Invalid name for new guest: Guest name '{name}' is already in use.", 1)
    domains[name] = {"state": "shut off", "description": "", "snapshots": []}
    save_state(state)
    print(f"Clone '{name}' created successfully.")


def fake_sudo(argv: list[str]) -> None:
    log("sudo", argv)
    if argv[:2] != ["-n", "--"]:
        fail("sudo: the fake accepts only `sudo -n -- COMMAND...`", 1)
    os.execvp(argv[2], argv[2:])


def fake_argv_recorder(argv: list[str]) -> None:
    log("argv-recorder", argv)


def main() -> None:
    tool, argv = sys.argv[1], sys.argv[2:]
    if tool == "ssh":
        fake_ssh(argv)
    elif tool in ("pct", "qm"):
        fake_proxmox(tool, argv)
    elif tool == "incus":
        fake_incus(argv)
    elif tool == "virsh":
        fake_virsh(argv)
    elif tool == "virt-clone":
        fake_virt_clone(argv)
    elif tool == "sudo":
        fake_sudo(argv)
    elif tool == "argv-recorder":
        fake_argv_recorder(argv)
    else:
        fail(f"fake_hosts.py does not stand in for {tool!r}", 127)


if __name__ == "__main__":
    main()
