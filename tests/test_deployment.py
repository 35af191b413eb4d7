"""Deployment files: docker/Dockerfile, docker/docker-compose.yml and the systemd unit.

No Docker engine runs here. docker-compose 1.29, Debian's package that
`bin/setup --test` installs, validates and resolves the Compose file. The Dockerfile
is parsed and compared with setup.py, the taskvisor command and the Compose file, and
`systemd-analyze verify` checks the units.
"""

import ast
import ipaddress
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml
from setuptools import find_packages

from shared.settings import Config, load_config
from supervisor.main import ABORT_MARGIN_SECONDS, SERVICE_STOP_SECONDS

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "docker" / "Dockerfile"
COMPOSE_FILE = ROOT / "docker" / "docker-compose.yml"
COMPOSE_ENV = ROOT / "docker" / ".env.example"
COMPOSE_CONFIG = ROOT / "docker" / "taskvisor.yaml"
SYSTEMD_DIR = ROOT / "examples" / "systemd"
UNIT_FILE = SYSTEMD_DIR / "taskvisor.service"
HEALTH_UNIT_FILE = SYSTEMD_DIR / "taskvisor-health.service"
TASKVISOR = Path(sys.executable).with_name("taskvisor")
# Seconds the supervisor waits for children after it sent them SIGKILL, twice in
# Supervisor.shutdown: once for the workers, once for the intake, mirror and monitor.
SIGKILL_WAITS_SECONDS = 10.0


def worst_case_stop_seconds(config: Config) -> float:
    """Return the longest time `taskvisor supervise` takes to exit after SIGTERM with `config`."""
    kill_grace = max((provider.driver.kill_grace for provider in config.providers.values()), default=5.0)
    return (config.supervisor.shutdown_grace + kill_grace + ABORT_MARGIN_SECONDS + SERVICE_STOP_SECONDS
            + SIGKILL_WAITS_SECONDS)


def cli_commands() -> set[str]:
    """Return the subcommands that `taskvisor --help` lists."""
    output = subprocess.run([str(TASKVISOR), "--help"], capture_output=True, text=True, check=True).stdout
    listing = output.split("\nCommands:\n", 1)[1]
    return {line.split()[0] for line in listing.splitlines() if line.startswith("  ") and line.strip()}


def setup_arguments() -> dict:
    """Return the keyword arguments of the setup() call in setup.py that are literals."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    call = next(node for node in ast.walk(tree) if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "setup")
    arguments = {}
    for keyword in call.keywords:
        try:
            arguments[keyword.arg] = ast.literal_eval(keyword.value)
        except ValueError:
            arguments[keyword.arg] = keyword.value
    return arguments


def package_include_patterns() -> list[str]:
    tree = ast.parse((ROOT / "setup.py").read_text())
    call = next(node for node in ast.walk(tree) if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "find_packages")
    return ast.literal_eval(next(keyword.value for keyword in call.keywords if keyword.arg == "include"))


# -- Dockerfile -----------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """Return (INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in DOCKERFILE.read_text().splitlines():
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        if text.endswith("\\"):
            pending += text[:-1] + " "
            continue
        keyword, _, arguments = (pending + text).partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
        pending = ""
    assert not pending, "the Dockerfile ends inside a continuation line"
    return instructions


def instruction_values(name: str) -> list[str]:
    return [arguments for keyword, arguments in dockerfile_instructions() if keyword == name]


def dockerfile_env() -> dict[str, str]:
    env = {}
    for arguments in instruction_values("ENV"):
        for item in shlex.split(arguments):
            key, _, value = item.partition("=")
            env[key] = value
    return env


def dockerfile_cmd() -> list[str]:
    (cmd,) = instruction_values("CMD")
    return json.loads(cmd)


def config_option(argv: list[str]) -> str:
    assert "--config" in argv, f"{argv} names no --config"
    return argv[argv.index("--config") + 1]


def test_dockerfile_slim_base_and_user() -> None:
    (base,) = instruction_values("FROM")
    image, _, tag = base.partition(":")
    assert image == "python"
    assert tag.endswith("-slim"), f"base image {base} is not a slim variant"
    minimum = re.fullmatch(r">=(\d+)\.(\d+)", setup_arguments()["python_requires"]).groups()
    assert tuple(int(part) for part in tag.removesuffix("-slim").split(".")) >= tuple(int(part) for part in minimum)

    users = instruction_values("USER")
    assert users, "the image must not run as root"
    user = users[-1]
    assert user not in ("root", "0")
    runs = [arguments for keyword, arguments in dockerfile_instructions() if keyword in ("RUN", "USER")]
    creates = [run for run in runs[: runs.index(user)] if "useradd" in run and re.search(rf"\s{user}(\s|$)", run)]
    assert creates, f"no RUN creates the user {user} before USER"
    assert "--system" in creates[0]
    assert instruction_values("STOPSIGNAL") == ["SIGTERM"]


def test_dockerfile_installs_runtime_like_checkout() -> None:
    runs = instruction_values("RUN")
    setup_runs = [run for run in runs if re.search(r"(^|\s)bin/setup(\s|$)", run)]
    assert len(setup_runs) == 1, "the image installs the project with bin/setup, as a checkout does"
    assert "--test" not in setup_runs[0]

    extras = setup_arguments()["extras_require"]
    assert set(extras) == {"test"}, f"setup.py has extras {sorted(extras)}: decide which ones the image installs"
    for run in runs:
        assert not re.search(r"\[\s*test\s*\]|pytest", run), f"the image installs test dependencies: {run}"

    # Every package that setup.py installs, and what bin/setup needs, is copied in.
    copied = {shlex.split(arguments)[0].rstrip("/") for arguments in instruction_values("COPY")}
    top_level = {name.split(".")[0] for name in find_packages(str(ROOT), include=package_include_patterns())}
    assert top_level <= copied, f"packages not copied into the image: {sorted(top_level - copied)}"
    assert {"setup.py", "bin/setup"} <= copied
    assert "tests" not in copied
    for source in copied:
        assert (ROOT / source).exists(), f"COPY source {source} does not exist"


def test_dockerfile_cmd_and_healthcheck_are_cli_commands() -> None:
    commands = cli_commands()
    cmd = dockerfile_cmd()
    assert cmd[0] == "taskvisor"
    assert cmd[1] in commands
    assert cmd[1] == "supervise"
    assert config_option(cmd) == dockerfile_env()["TASKVISOR_CONFIG"]

    (healthcheck,) = instruction_values("HEALTHCHECK")
    options, _, command = healthcheck.partition(" CMD ")
    check_timeout = float(re.search(r"--timeout=(\d+)s", options).group(1))
    argv = json.loads(command)
    assert argv[:2] == ["sh", "-c"]
    words = shlex.split(argv[2])
    start = words.index("taskvisor")
    assert words[start + 1] in commands
    assert words[start + 1] == "health"
    assert float(words[words.index("--timeout") + 1]) < check_timeout

    # The command as the image runs it, with the Compose config: it must find the
    # endpoint on 127.0.0.1 although health.address is 0.0.0.0, and never exit with 2,
    # which Docker reserves. Whether a supervisor listens there does not matter.
    env = {**os.environ, "PATH": f"{TASKVISOR.parent}{os.pathsep}{os.environ['PATH']}",
           "TASKVISOR_CONFIG": str(COMPOSE_CONFIG)}
    completed = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=30, check=False)
    assert completed.returncode in (0, 1), completed.stderr
    assert "http://127.0.0.1:9180/readyz" in completed.stdout + completed.stderr


# -- Compose ----------------------------------------------------------------------------------


def docker_compose(*arguments: str) -> subprocess.CompletedProcess:
    executable = shutil.which("docker-compose")
    assert executable, "docker-compose is not installed: run bin/setup --test"
    env = {key: value for key, value in os.environ.items() if key not in ("TASKVISOR_DB_PASSWORD", "MYSQL_ROOT_PASSWORD")}
    return subprocess.run([executable, "-f", str(COMPOSE_FILE), "--env-file", str(COMPOSE_ENV), *arguments],
                          env=env, capture_output=True, text=True, timeout=60, check=False)


@pytest.fixture(scope="module")
def compose() -> dict:
    """The Compose file as docker-compose resolves it, with variables filled in."""
    completed = docker_compose("config")
    assert completed.returncode == 0, completed.stderr
    return yaml.safe_load(completed.stdout)


def volume_mounts(service: dict) -> list[dict]:
    """Return the service's volumes as {type, source, target, read_only}; 1.29 prints the short syntax."""
    mounts = []
    for entry in service.get("volumes", []):
        if isinstance(entry, dict):
            mounts.append({**entry, "read_only": bool(entry.get("read_only"))})
            continue
        source, target, *mode = entry.split(":")
        kind = "bind" if source.startswith("/") else "volume"
        mounts.append({"type": kind, "source": source, "target": target, "read_only": mode == ["ro"]})
    return mounts


def published_ports(service: dict) -> list[dict]:
    """Return the service's ports as {host_ip, published, target}; 1.29 prints the short syntax."""
    ports = []
    for entry in service.get("ports", []):
        if isinstance(entry, dict):
            ports.append(entry)
            continue
        host_ip, published, target = entry.split("/")[0].rsplit(":", 2)
        ports.append({"host_ip": host_ip, "published": int(published), "target": int(target)})
    return ports


def seconds(duration: str) -> float:
    parts = re.fullmatch(r"(?:(\d+)m)?(?:(\d+(?:\.\d+)?)s)?", duration)
    assert parts and duration, f"unexpected duration {duration!r}"
    return int(parts.group(1) or 0) * 60 + float(parts.group(2) or 0)


def test_compose_file_is_valid() -> None:
    completed = docker_compose("config", "-q")
    assert completed.returncode == 0, completed.stderr
    assert completed.stderr == "", completed.stderr


def test_compose_services_and_persistence(compose: dict) -> None:
    services = compose["services"]
    assert set(services) == {"redis", "mysql", "taskvisor"}
    for name, service in services.items():
        assert service.get("restart") in ("always", "unless-stopped", "on-failure"), name

    redis_command = services["redis"]["command"]
    assert redis_command[redis_command.index("--appendonly") + 1] == "yes"
    assert redis_command[redis_command.index("--appendfsync") + 1] in ("always", "everysec")
    assert redis_command[redis_command.index("--maxmemory-policy") + 1] == "noeviction"
    assert any(mount["target"] == "/data" and mount["type"] == "volume" for mount in volume_mounts(services["redis"]))

    image, _, version = services["mysql"]["image"].partition(":")
    assert image == "mysql"
    assert version.split(".")[0] == "8"
    assert set(services["taskvisor"]["depends_on"]) == {"redis", "mysql"}

    for name, service in services.items():
        for port in published_ports(service):
            assert port["host_ip"] == "127.0.0.1", f"{name} publishes port {port} beyond the host's loopback"


def test_compose_supervisor_matches_image_and_config(compose: dict) -> None:
    service = compose["services"]["taskvisor"]
    mounts = {mount["target"]: mount for mount in volume_mounts(service)}
    config_path = config_option(service.get("command") or dockerfile_cmd())

    config_mount = mounts[config_path]
    assert Path(config_mount["source"]) == COMPOSE_CONFIG
    assert config_mount["read_only"]
    config = load_config(COMPOSE_CONFIG)

    assert urlsplit(config.redis.url).hostname == "redis"
    database = urlsplit(service["environment"]["TASKVISOR_DATABASE_URL"])
    mysql = compose["services"]["mysql"]["environment"]
    assert database.hostname == "mysql"
    assert database.username == mysql["MYSQL_USER"]
    assert database.password == mysql["MYSQL_PASSWORD"]
    assert database.path.lstrip("/") == mysql["MYSQL_DATABASE"]

    # The published port must reach the endpoint, so it listens on all addresses.
    assert ipaddress.ip_address(config.health.address).is_unspecified
    assert config.health.allow_non_loopback
    assert [int(port["target"]) for port in published_ports(service)] == [config.health.port]

    assert seconds(service["stop_grace_period"]) > worst_case_stop_seconds(config)


def test_compose_command_scripts_are_mounted(compose: dict) -> None:
    service = compose["services"]["taskvisor"]
    config_dir = Path(config_option(dockerfile_cmd())).parent
    mounts = {Path(mount["target"]): Path(mount["source"]) for mount in volume_mounts(service) if mount["type"] == "bind"}
    config = load_config(COMPOSE_CONFIG)
    command_providers = {name: p for name, p in config.providers.items() if p.driver.type == "command"}
    assert command_providers, "the Compose config should have a command-driver provider"

    for name, provider in command_providers.items():
        workdir = config_dir / provider.driver.workdir
        for argv in [*provider.driver.commands.values(), *provider.driver.probes.values()]:
            program = workdir / argv[0]
            mount = next((target for target in mounts if program.is_relative_to(target)), None)
            assert mount is not None, f"{name}: {program} is on no volume of the taskvisor service"
            host_path = mounts[mount] / program.relative_to(mount)
            assert host_path.is_file(), f"{name}: {host_path} does not exist"
            assert os.access(host_path, os.X_OK), f"{name}: {host_path} is not executable"


def test_readmes_describe_compose_start() -> None:
    command = "docker-compose -f docker/docker-compose.yml up -d --build"
    for readme in ("README.md", "README.zh-CN.md"):
        text = (ROOT / readme).read_text()
        assert command in text, f"{readme} does not show how to start the Compose deployment"
        assert "docs/operations.md" in text
        assert "docs/troubleshooting.md" in text
    assert "cp docker/.env.example docker/.env" in (ROOT / "README.md").read_text()


# -- systemd ------------------------------------------------------------------------------


def unit_settings(path: Path = UNIT_FILE) -> dict[str, dict[str, list[str]]]:
    """Parse a unit file into section -> key -> values (a key may repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for line in path.read_text().splitlines():
        text = line.strip()
        if not text or text.startswith(("#", ";")):
            continue
        if text.startswith("["):
            current = sections.setdefault(text.strip("[]"), {})
            continue
        key, _, value = text.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def test_systemd_unit_signals_and_restart() -> None:
    unit = unit_settings()
    service = {key: values[-1] for key, values in unit["Service"].items()}

    assert service["KillSignal"] == "SIGTERM"
    assert service["KillMode"] == "mixed"
    assert float(service["TimeoutStopSec"]) > worst_case_stop_seconds(Config())
    assert service["Restart"] == "on-failure"
    assert float(service["RestartSec"]) > 0
    assert int(unit["Unit"]["StartLimitBurst"][-1]) > 0
    assert service["User"] not in ("root", "0")
    assert shlex.split(service["ExecReload"]) == ["/bin/kill", "-HUP", "$MAINPID"]

    exec_start = shlex.split(service["ExecStart"])
    assert exec_start[0].endswith("/.venv/bin/taskvisor"), "the unit runs the taskvisor that bin/setup installs"
    assert exec_start[1] in cli_commands()
    assert exec_start[1] == "supervise"
    assert config_option(exec_start)


def test_systemd_units_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is not installed (Debian package systemd)"
    # verify checks that ExecStart exists, so point it at this checkout's taskvisor.
    installed = shlex.split(unit_settings()["Service"]["ExecStart"][-1])[0]
    units = sorted(SYSTEMD_DIR.iterdir())
    assert [unit.name for unit in units] == ["taskvisor-health.service", "taskvisor-health.timer", "taskvisor.service"]
    for unit in units:
        (tmp_path / unit.name).write_text(unit.read_text().replace(installed, str(TASKVISOR)))
    copies = [str(tmp_path / unit.name) for unit in units]
    completed = subprocess.run([analyze, "verify", *copies], capture_output=True, text=True, timeout=60, check=False)
    assert completed.returncode == 0, completed.stderr
    # verify only warns about unknown keys and invalid values, so any output is a failure.
    assert completed.stdout + completed.stderr == ""
