#!/usr/bin/env python3
"""Forced command for the SSH key that taskvisor's host scripts use on a host.

Install it on the Proxmox VE, Incus or libvirt host, for example as
/usr/local/sbin/taskvisor-ssh-guard, and name it in the key's line of the remote
user's ~/.ssh/authorized_keys with the programs the key may run:

    restrict,command="/usr/local/sbin/taskvisor-ssh-guard pct qm" ssh-ed25519 AAAA... taskvisor

sshd then runs this program for every connection with that key and puts the client's
command line in SSH_ORIGINAL_COMMAND. The guard splits that line with the POSIX shell's
quoting rules, which the host scripts follow (hostlib.quote_command). It runs the
result without a shell when the program is one of those named, alone or after
`sudo -n --`, so `;`, `$(...)` and redirections reach the program as plain argument
text. Any other command line is rejected with exit status 126.
"""

import os
import shlex
import sys

EXIT_REJECTED = 126


def allowed_argv(command_line: str, programs: set[str]) -> list[str]:
    """Return the argv to run for `command_line`; raises ValueError when it is not allowed."""
    argv = shlex.split(command_line)
    program_index = 3 if argv[:3] == ["sudo", "-n", "--"] else 0
    if len(argv) <= program_index or argv[program_index] not in programs:
        raise ValueError(f"program not allowed: expected one of {', '.join(sorted(programs))}")
    return argv


def main() -> None:
    programs = set(sys.argv[1:])
    command_line = os.environ.get("SSH_ORIGINAL_COMMAND", "")
    if not programs:
        print("taskvisor-ssh-guard: no programs allowed: name them after the guard in authorized_keys", file=sys.stderr)
        sys.exit(EXIT_REJECTED)
    try:
        argv = allowed_argv(command_line, programs)
    except ValueError as exc:
        # Cut the echoed command, which may be long.
        print(f"taskvisor-ssh-guard: rejected {command_line[:200]!r}: {exc}", file=sys.stderr)
        sys.exit(EXIT_REJECTED)
    try:
        os.execvp(argv[0], argv)
    except OSError as exc:
        print(f"taskvisor-ssh-guard: cannot run {argv[0]}: {exc}", file=sys.stderr)
        sys.exit(127)


if __name__ == "__main__":
    main()
