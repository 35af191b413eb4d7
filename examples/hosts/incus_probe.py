#!/usr/bin/env python3
"""taskvisor probe for incus_host.py: what did an interrupted create or delete do?

Usage, as the provider's probe for create and delete:
    ["./incus_probe.py", "{type}", "{instance}", "{id}"]

It returns the same outcomes as pve_probe.py. For create, no instance is `not_done`,
and one that another task made is `failed`. This task's instance is `completed` when
it runs and has its snapshot, and `not_done` otherwise. For delete, no instance is
`completed` and an instance is `not_done`. Other types are `not_done`.
"""

from hostlib import probe_main
from incus_host import IncusBackend

if __name__ == "__main__":
    probe_main(IncusBackend)
