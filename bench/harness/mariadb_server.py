"""A private MariaDB server on a free loopback port, for the taskvisor-mariadb rows of one benchmark run.

`mariadb-install-db` creates the system tables in bench/scratch/<name>/mariadb/data, and
`mariadbd --no-defaults` serves that directory on 127.0.0.1 only. Without an option
file the server uses MariaDB's built-in settings, and the MariaDB that the machine may
run for other purposes, with its port, socket and data, is never touched.
"""

import os
import shutil
import subprocess
import tempfile
import time

import pymysql

from harness.redis_server import free_loopback_port

INSTALL_TIMEOUT_SECONDS = 180.0
START_TIMEOUT_SECONDS = 60.0
STOP_TIMEOUT_SECONDS = 30.0
# Linux limits a Unix socket path to 107 bytes, so a longer scratch path puts the socket in /tmp.
MAX_SOCKET_PATH = 100
# Seconds that the harness's own connections wait to connect, and for each reply.
CLIENT_TIMEOUT_SECONDS = 5


def find_program(name: str) -> str:
    """Return the path of a MariaDB program, from PATH or /usr/sbin, or exit with the package to install."""
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin")
    if found is None:
        raise SystemExit(f"{name} is not installed: run apt-get install mariadb-server, or leave the"
                         " taskvisor-mariadb row out with --only")  # fmt: skip
    return found


def user_options() -> list[str]:
    # mariadbd exits at start when it runs as root without --user=root.
    return ["--user=root"] if os.geteuid() == 0 else []


class PrivateMariadb:
    """One `mariadbd --no-defaults` bound to 127.0.0.1, with its data directory in `workdir`, stopped by `stop()`.

    root may connect from 127.0.0.1 without a password, which is safe only because the
    server listens on the loopback address alone.
    """

    def __init__(self, workdir: str) -> None:
        self.workdir = workdir
        self.datadir = os.path.join(workdir, "data")
        self.error_log = os.path.join(workdir, "error.log")
        self.process: subprocess.Popen | None = None
        self.port = 0
        socket_path = os.path.join(workdir, "mariadbd.sock")
        if len(socket_path) > MAX_SOCKET_PATH:
            socket_path = os.path.join(tempfile.mkdtemp(prefix="bench-mariadb-"), "mariadbd.sock")
        self.socket_path = socket_path

    def url(self, database: str) -> str:
        """Return the store URL of `database` as taskvisor's `database.url` takes it."""
        return f"mysql://root@127.0.0.1:{self.port}/{database}"

    def connect(self, database: str | None = None, timeout: float = CLIENT_TIMEOUT_SECONDS) -> pymysql.Connection:
        """Open an autocommit connection as root. Each statement then reads the latest committed rows."""
        if not self.port:
            # PyMySQL would fall back to port 3306, where the machine's own MariaDB may listen.
            raise RuntimeError("the private MariaDB has no port yet: call start() first")
        return pymysql.connect(host="127.0.0.1", port=self.port, user="root", database=database, autocommit=True,
                               connect_timeout=timeout, read_timeout=timeout, write_timeout=timeout)  # fmt: skip

    def install(self) -> None:
        """Create the system tables, with root allowed in from 127.0.0.1 without a password."""
        os.makedirs(self.workdir, exist_ok=True)
        shutil.rmtree(self.datadir, ignore_errors=True)
        command = [
            find_program("mariadb-install-db"), "--no-defaults", f"--datadir={self.datadir}",
            "--auth-root-authentication-method=normal", "--skip-test-db", "--skip-name-resolve", *user_options(),
        ]  # fmt: skip
        completed = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                   timeout=INSTALL_TIMEOUT_SECONDS, check=False)  # fmt: skip
        if completed.returncode != 0:
            raise SystemExit(f"mariadb-install-db failed with status {completed.returncode}:\n"
                             f"{(completed.stdout + completed.stderr)[-3000:]}")  # fmt: skip

    def start(self) -> None:
        """Install the data directory, start mariadbd and wait until it accepts connections."""
        self.install()
        tmpdir = os.path.join(self.workdir, "tmp")
        os.makedirs(tmpdir, exist_ok=True)
        # The port can be taken between the probe and the server's bind, so try a few.
        for _attempt in range(5):
            self.port = free_loopback_port()
            command = [
                find_program("mariadbd"), "--no-defaults", f"--datadir={self.datadir}", f"--tmpdir={tmpdir}",
                f"--socket={self.socket_path}", f"--pid-file={os.path.join(self.workdir, 'mariadbd.pid')}",
                f"--log-error={self.error_log}", "--bind-address=127.0.0.1", f"--port={self.port}",
                "--skip-networking=0", "--skip-name-resolve", *user_options(),
            ]  # fmt: skip
            # Lines written before the error log opens, such as the open files warning, go to this file.
            with open(os.path.join(self.workdir, "mariadbd.out"), "ab") as output:
                self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=output,
                                                stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
            if self._wait_ready():
                return
            self._terminate()
        raise SystemExit(f"mariadbd did not start on a free loopback port; see {self.error_log}")

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            try:
                self.connect(timeout=1).close()
                return True
            except pymysql.MySQLError:
                time.sleep(0.05)
        return False

    def version(self) -> str:
        connection = self.connect()
        try:
            with connection.cursor() as cursor:
                cursor.execute("SELECT VERSION()")
                return cursor.fetchone()[0]
        finally:
            connection.close()

    def recreate_database(self, database: str) -> None:
        """Drop `database` if it exists and create it empty, with the character set that taskvisor's tables use."""
        connection = self.connect()
        try:
            with connection.cursor() as cursor:
                cursor.execute(f"DROP DATABASE IF EXISTS `{database}`")
                cursor.execute(f"CREATE DATABASE `{database}` CHARACTER SET utf8mb4 COLLATE utf8mb4_bin")
        finally:
            connection.close()

    def stop(self) -> None:
        """Shut the server down with SIGTERM, and with SIGKILL when it has not exited after STOP_TIMEOUT_SECONDS."""
        self._terminate()
        if os.path.dirname(self.socket_path) != self.workdir:
            shutil.rmtree(os.path.dirname(self.socket_path), ignore_errors=True)

    def _terminate(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(STOP_TIMEOUT_SECONDS)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
