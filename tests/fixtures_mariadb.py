"""A private MariaDB server per test, on a free loopback port, that a test may stop and start.

`mariadb-install-db` runs once per session into a template data directory, and each test
that requests `mariadb_server` gets a copy of it. The server reads no option file
(`--no-defaults`), so the machine's own MariaDB and its settings are never touched. The
fixtures fail, and never skip, when the MariaDB programs are missing.
"""

import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pymysql
import pytest

from shared.process import die_with_parent
from tests.fixtures_redis import free_port

START_TIMEOUT_SECONDS = 30.0
STOP_TIMEOUT_SECONDS = 30.0
INSTALL_TIMEOUT_SECONDS = 120.0
DATABASE = "taskvisor"
# Linux limits a Unix socket path to 107 bytes, and a deep pytest temporary folder can exceed it.
MAX_SOCKET_PATH = 100

# Sizes that keep the data directory at about 20 MB, so copying and starting it is quick.
_SIZE_OPTIONS = ["--innodb-buffer-pool-size=16M", "--innodb-log-file-size=4M"]


def _find_program(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin")
    if not found:
        pytest.fail(f"{name} is missing: install the mariadb-server package (bin/test does when run as root)")
    return found


def _user_options() -> list[str]:
    # mariadbd exits at start when it runs as root without this option.
    return ["--user=root"] if os.geteuid() == 0 else []


def install_datadir(datadir: Path) -> None:
    """Create the system tables in `datadir`, with root allowed in from 127.0.0.1 without a password."""
    command = [
        _find_program("mariadb-install-db"), "--no-defaults", f"--datadir={datadir}",
        "--auth-root-authentication-method=normal", "--skip-test-db", "--skip-name-resolve",
        *_user_options(), *_SIZE_OPTIONS,
    ]  # fmt: skip
    result = subprocess.run(
        command, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_SECONDS, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"mariadb-install-db failed with exit code {result.returncode}:\n{result.stdout}{result.stderr}")


class MariadbServer:
    """A mariadbd child process on 127.0.0.1 that keeps its port and data directory across restarts.

    `start()` returns once the server accepts connections, `stop()` shuts it down cleanly
    or, with `kill=True`, with SIGKILL, as a crash would.
    """

    def __init__(self, directory: Path, template: Path) -> None:
        self.directory = directory
        self.datadir = directory / "data"
        self.error_log = directory / "error.log"
        self.port = free_port()
        self.process: subprocess.Popen | None = None
        shutil.copytree(template, self.datadir)
        (directory / "tmp").mkdir()

        socket_path = directory / "mariadbd.sock"
        if len(str(socket_path)) > MAX_SOCKET_PATH:
            socket_path = Path(tempfile.mkdtemp(prefix="mariadb-")) / "mariadbd.sock"
        self.socket_path = socket_path

    @property
    def url(self) -> str:
        """Store URL of the test database, as root without a password."""
        return f"mysql://root@127.0.0.1:{self.port}/{DATABASE}"

    def connect(self, database: str | None = DATABASE, **arguments: object) -> pymysql.Connection:
        """Open an autocommit connection as root, for setup, checks and interference."""
        return pymysql.connect(
            host="127.0.0.1", port=self.port, user="root", database=database, autocommit=True, **arguments
        )

    def start(self, timeout: float = START_TIMEOUT_SECONDS) -> None:
        """Start mariadbd and wait until it accepts connections, raising RuntimeError if it does not."""
        if self.process is not None and self.process.poll() is None:
            raise RuntimeError(f"mariadbd on port {self.port} is already running")
        command = [
            _find_program("mariadbd"), "--no-defaults", f"--datadir={self.datadir}",
            f"--tmpdir={self.directory / 'tmp'}", f"--socket={self.socket_path}",
            f"--pid-file={self.directory / 'mariadbd.pid'}", f"--log-error={self.error_log}",
            "--bind-address=127.0.0.1", f"--port={self.port}", "--skip-networking=0", "--skip-name-resolve",
            *_user_options(), *_SIZE_OPTIONS,
        ]  # fmt: skip
        # Lines written before the error log opens, such as the open files warning, go to this file.
        with open(self.directory / "mariadbd.out", "ab") as output:
            self.process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                # So that a killed pytest leaves no server behind. Tests start servers from one thread.
                preexec_fn=lambda: die_with_parent(signal.SIGKILL),  # noqa: PLW1509
            )

        deadline = time.monotonic() + timeout
        while True:
            try:
                self.connect(database=None, connect_timeout=1).close()
                return
            except pymysql.MySQLError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop(kill=True)
                    raise RuntimeError(f"mariadbd on port {self.port} did not start:\n{self.log_tail()}") from None
                time.sleep(0.02)

    def stop(self, kill: bool = False, timeout: float = STOP_TIMEOUT_SECONDS) -> None:
        """Shut the server down with SIGTERM, or SIGKILL when `kill`, and wait until it has exited."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise RuntimeError(f"mariadbd on port {self.port} did not stop within {timeout:g} s") from None

    def log_tail(self, characters: int = 3000) -> str:
        if not self.error_log.exists():
            return "(no error log)"
        return self.error_log.read_text(errors="replace")[-characters:]


@pytest.fixture(scope="session")
def mariadb_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data directory made by mariadb-install-db once per session, for tests to copy."""
    datadir = tmp_path_factory.mktemp("mariadb-template") / "data"
    install_datadir(datadir)
    return datadir


@pytest.fixture
def mariadb_server(tmp_path: Path, mariadb_template: Path) -> Iterator[MariadbServer]:
    """A running private MariaDB with an empty database `taskvisor`, killed after the test."""
    directory = tmp_path / "mariadb"
    directory.mkdir()
    server = MariadbServer(directory, mariadb_template)
    server.start()
    connection = server.connect(database=None)
    try:
        with connection.cursor() as cursor:
            cursor.execute(f"CREATE DATABASE {DATABASE} CHARACTER SET utf8mb4 COLLATE utf8mb4_bin")
    finally:
        connection.close()

    yield server

    # The data is thrown away, so a clean shutdown would only cost time.
    server.stop(kill=True)
    shutil.rmtree(server.datadir, ignore_errors=True)
    if server.socket_path.parent != directory:
        shutil.rmtree(server.socket_path.parent, ignore_errors=True)
