"""A private Podman engine that serves the Docker Engine API on a unix socket in a temporary folder.

Everything the engine writes (image and container storage, run state, events, network
config) goes into that folder, and `stop()` removes the containers, the processes the
engine left behind, its mounts and the folder. Containers get no network (`none`), so
the tests change no firewall rule or bridge on the host.

The test image is imported from a tarball of a folder with the static busybox of the
busybox-static package. Debian's busybox has no chpasswd applet, so the image carries
a small shell script in its place that reads `user:password` lines on stdin, like
chpasswd, and writes SHA-512 hashes into /etc/shadow.
"""

import os
import shutil
import signal
import socket
import subprocess
import tarfile
import time
from pathlib import Path

import psutil

TEST_IMAGE = "localhost/taskvisor-busybox:test"
BUSYBOX = "/bin/busybox"
BUSYBOX_APPLETS = ("sh", "sleep", "cat", "awk", "mkpasswd", "rm", "touch", "ls")
# Podman 4.3 writes these outside its --root and --runroot whatever containers.conf sets: the
# blob info cache of `podman import`, an empty network run folder, and the parent cgroup of the
# cgroupfs manager. stop() removes each one that did not exist before start().
HOST_STATE_PATHS = ("/var/lib/containers", "/run/containers")
CGROUP_PARENT = "libpod_parent"
START_TIMEOUT_SECONDS = 30.0
STOP_TIMEOUT_SECONDS = 10.0

CHPASSWD_SCRIPT = """#!/bin/sh
# Stand-in for chpasswd: reads user:password lines on stdin and stores SHA-512 hashes in /etc/shadow.
set -e
while IFS= read -r line; do
    user=${line%%:*}
    hash=$(printf '%s\\n' "${line#*:}" | mkpasswd -m sha512)
    if ! awk -F: -v user="$user" -v hash="$hash" \\
        'BEGIN { OFS = ":" } $1 == user { $2 = hash; found = 1 } { print } END { exit !found }' \\
        /etc/shadow > /etc/shadow.new; then
        rm -f /etc/shadow.new
        echo "chpasswd: user '$user' does not exist" >&2
        exit 1
    fi
    cat /etc/shadow.new > /etc/shadow
    rm /etc/shadow.new
done
"""

PASSWD = "root:x:0:0:root:/root:/bin/sh\nadmin:x:1000:1000:admin:/home/admin:/bin/sh\n"
SHADOW = "root:*:19000:0:99999:7:::\nadmin:*:19000:0:99999:7:::\n"
GROUP = "root:x:0:\nadmin:x:1000:\n"


def require_tools() -> None:
    """Fail with the install command when podman, runc or a static busybox is missing."""
    missing = [name for name in ("podman", "runc", "conmon") if shutil.which(name) is None
               and not Path("/usr/bin", name).exists()]
    if not is_static_binary(BUSYBOX):
        missing.append("busybox-static")
    if missing:
        raise AssertionError(
            f"the Docker driver tests need {', '.join(missing)}: run bin/setup --test as root, "
            f"or apt-get install podman runc busybox-static"
        )


def is_static_binary(path: str) -> bool:
    """Return whether `path` is an ELF executable without a program interpreter, so it runs in an empty image."""
    try:
        with open(path, "rb") as file:
            header = file.read(4096)
    except OSError:
        return False
    return header.startswith(b"\x7fELF") and b"/ld-linux" not in header and b"ld-musl" not in header


class PodmanEngine:
    """`podman system service` on `<folder>/podman.sock` with its storage in `folder`."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.socket_path = folder / "podman.sock"
        self.log_path = folder / "service.log"
        self.config_path = folder / "containers.conf"
        self.process: subprocess.Popen | None = None
        self.log_file = None
        self.created_host_paths: list[Path] = []

    @property
    def endpoint(self) -> str:
        return f"unix://{self.socket_path}"

    def environment(self) -> dict[str, str]:
        return dict(os.environ, CONTAINERS_CONF=str(self.config_path))

    def podman(self, *args: str, input_text: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
        """Run the podman command line on this engine's storage."""
        argv = ["podman", "--root", str(self.folder / "root"), "--runroot", str(self.folder / "runroot"), *args]
        result = subprocess.run(argv, env=self.environment(), input=input_text, capture_output=True, text=True,
                                timeout=60, check=False)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} exited with {result.returncode}: {result.stderr.strip()}")
        return result

    def start(self) -> None:
        self.created_host_paths = [path for path in host_state_candidates() if not path.exists()]
        self.write_config()
        self.import_image()
        self.log_file = open(self.log_path, "ab")
        argv = ["podman", "--root", str(self.folder / "root"), "--runroot", str(self.folder / "runroot"),
                "system", "service", "--time=0", self.endpoint]
        self.process = subprocess.Popen(argv, env=self.environment(), stdin=subprocess.DEVNULL,
                                        stdout=self.log_file, stderr=subprocess.STDOUT)
        self.wait_until_ready()

    def write_config(self) -> None:
        for name in ("tmp", "networks"):
            (self.folder / name).mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(
            "[containers]\n"
            "default_ulimits = []\n"
            "[engine]\n"
            'cgroup_manager = "cgroupfs"\n'
            'runtime = "runc"\n'
            'events_logger = "file"\n'
            f'tmp_dir = "{self.folder / "tmp"}"\n'
            f'image_copy_tmp_dir = "{self.folder / "tmp"}"\n'
            "[network]\n"
            f'network_config_dir = "{self.folder / "networks"}"\n'
        )

    def import_image(self) -> None:
        rootfs = self.folder / "rootfs"
        for name in ("bin", "etc", "tmp", "root", "home/admin"):
            (rootfs / name).mkdir(parents=True, exist_ok=True)
        shutil.copy(BUSYBOX, rootfs / "bin" / "busybox")
        for applet in BUSYBOX_APPLETS:
            (rootfs / "bin" / applet).symlink_to("busybox")
        chpasswd = rootfs / "bin" / "chpasswd"
        chpasswd.write_text(CHPASSWD_SCRIPT)
        chpasswd.chmod(0o755)
        (rootfs / "etc" / "passwd").write_text(PASSWD)
        (rootfs / "etc" / "group").write_text(GROUP)
        (rootfs / "etc" / "shadow").write_text(SHADOW)
        (rootfs / "etc" / "shadow").chmod(0o600)

        tarball = self.folder / "rootfs.tar"
        with tarfile.open(tarball, "w") as archive:
            archive.add(rootfs, arcname=".")
        self.podman("import", str(tarball), TEST_IMAGE)

    def wait_until_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while True:
            if self.ping():
                return
            if self.process.poll() is not None or time.monotonic() > deadline:
                log = self.log_path.read_text(errors="replace")[-3000:]
                raise AssertionError(f"podman system service did not respond on {self.socket_path}:\n{log}")
            time.sleep(0.1)

    def ping(self) -> bool:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(2)
                sock.connect(str(self.socket_path))
                sock.sendall(b"GET /_ping HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                return sock.recv(64).startswith(b"HTTP/1.1 200")
        except OSError:
            return False

    def stop(self) -> None:
        """Remove every container, stop the service, end what it left running and delete the folder."""
        # The command line works on the storage directly, also when the service has died.
        listing = self.podman("ps", "--all", "--quiet", "--no-trunc", check=False)
        container_ids = listing.stdout.split()
        self.podman("rm", "--force", "--all", "--time", "0", check=False)
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_TIMEOUT_SECONDS)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(STOP_TIMEOUT_SECONDS)
        if self.log_file is not None:
            self.log_file.close()
        self.kill_leftover_processes(container_ids)
        self.unmount_leftovers()
        shutil.rmtree(self.folder, ignore_errors=True)
        self.remove_host_state()

    def kill_leftover_processes(self, container_ids: list[str]) -> None:
        """Kill what this engine left running: conmon monitors and the processes of removed containers.

        The conmon of an exec session outlives it by minutes, and each names this folder in
        its argv. A container process can survive its removal when a stop was still waiting
        out its grace period, so every process left in a container's cgroup is killed too.
        """
        marker = str(self.folder)
        pids = {process.pid for process in psutil.process_iter(["cmdline"])
                if any(marker in arg for arg in process.info["cmdline"] or [])}
        for container_id in container_ids:
            for parent in host_state_candidates():
                procs = parent / f"libpod-{container_id}" / "cgroup.procs"
                if parent.name == CGROUP_PARENT and procs.exists():
                    pids.update(int(pid) for pid in procs.read_text().split())
        killed = []
        for pid in pids:
            try:
                process = psutil.Process(pid)
                process.kill()
                killed.append(process)
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(killed, timeout=5)

    def unmount_leftovers(self) -> None:
        """Unmount what the storage driver mounted under this folder, deepest first."""
        marker = str(self.folder) + "/"
        with open("/proc/self/mounts") as mounts:
            points = [line.split()[1] for line in mounts if line.split()[1].startswith(marker)]
        for point in sorted(points, key=len, reverse=True):
            subprocess.run(["umount", "--lazy", point], check=False, capture_output=True)

    def remove_host_state(self) -> None:
        """Remove the host paths that the engine created outside its folder (see HOST_STATE_PATHS)."""
        for path in self.created_host_paths:
            if not path.exists():
                continue
            if path.is_relative_to("/sys/fs/cgroup"):
                remove_cgroup(path)
            else:
                shutil.rmtree(path)


def host_state_candidates() -> list[Path]:
    """Return the host paths that Podman may create outside its storage folders."""
    paths = [Path(name) for name in HOST_STATE_PATHS]
    cgroup_root = Path("/sys/fs/cgroup")
    paths.append(cgroup_root / CGROUP_PARENT)
    if cgroup_root.is_dir():
        paths += [hierarchy / CGROUP_PARENT for hierarchy in cgroup_root.iterdir()
                  if hierarchy.is_dir() and not hierarchy.is_symlink()]
    return paths


def remove_cgroup(path: Path) -> None:
    """Remove a cgroup folder and its children with rmdir, waiting up to 5 s for their processes to go."""
    folders = sorted((p for p in path.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True) + [path]
    deadline = time.monotonic() + 5
    for folder in folders:
        while True:
            try:
                folder.rmdir()
                break
            except OSError as exc:
                if time.monotonic() > deadline:
                    message = f"cgroup {folder} that the test engine created cannot be removed: {exc}"
                    raise AssertionError(message) from None
                time.sleep(0.1)
