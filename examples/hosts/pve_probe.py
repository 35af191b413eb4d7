#!/usr/bin/env python3
"""taskvisor probe for pve_host.py: what did an interrupted create or delete do?

Usage, as the provider's probe for create and delete:
    ["./pve_probe.py", "{type}", "{instance}", "{id}"]

For create, no guest is `not_done`. A guest that another task made, whose description
does not carry this task's id, is `failed`. This task's guest is `completed` when it
runs and has its snapshot, and `not_done` otherwise, because a rerun of pve_host.py
finishes it. For delete, no guest is `completed` and a guest is `not_done`. Other
task types are `not_done`, so they run again.
"""

from hostlib import probe_main
from pve_host import ProxmoxBackend

if __name__ == "__main__":
    probe_main(ProxmoxBackend)
