"""The machine, the package versions and the peers' virtual environments."""

import datetime
import hashlib
import json
import os
import platform
import subprocess
import sys

BENCH_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO_DIR = os.path.dirname(BENCH_DIR)

# Each peer environment: its folder, its requirements file and the distributions whose
# versions go into the report. arq 0.28 requires redis<6 and kombu 5.7 (Celery)
# requires redis>=6.4, so arq cannot share the environment of the other peers.
PEER_ENVIRONMENTS = {
    "peers": (".venv-peers", "requirements-peers.txt",
              ["celery", "kombu", "billiard", "rq", "dramatiq", "redis", "hiredis", "py-spy"]),
    "arq": (".venv-arq", "requirements-arq.txt", ["arq", "redis", "hiredis"]),
}  # fmt: skip
TASKVISOR_DISTRIBUTIONS = ["redis", "hiredis", "msgspec", "orjson", "PyYAML", "click", "psutil", "PyMySQL"]


def venv_python(name: str) -> str:
    folder, _requirements, _distributions = PEER_ENVIRONMENTS[name]
    return os.path.join(BENCH_DIR, folder, "bin", "python")


def base_python() -> str:
    """Return the interpreter that the taskvisor environment was made from, so all sides run one Python."""
    return getattr(sys, "_base_executable", None) or sys.executable


def ensure_peer_environments() -> None:
    """Create or update each peer environment when its requirements file changed."""
    for folder, requirements, _distributions in PEER_ENVIRONMENTS.values():
        path = os.path.join(BENCH_DIR, folder)
        requirements_path = os.path.join(BENCH_DIR, requirements)
        with open(requirements_path, "rb") as handle:
            digest = hashlib.sha256(handle.read()).hexdigest()
        stamp = os.path.join(path, ".requirements-sha256")
        if os.path.exists(stamp):
            with open(stamp, encoding="ascii") as handle:
                if handle.read().strip() == digest:
                    continue
        print(f"installing {requirements} into bench/{folder}", file=sys.stderr, flush=True)
        if not os.path.exists(os.path.join(path, "bin", "python")):
            subprocess.run([base_python(), "-m", "venv", path], check=True)
        subprocess.run([os.path.join(path, "bin", "python"), "-m", "pip", "install", "--quiet",
                        "-r", requirements_path], check=True)  # fmt: skip
        with open(stamp, "w", encoding="ascii") as handle:
            handle.write(digest + "\n")


def distribution_versions(python: str, names: list[str]) -> dict[str, str]:
    """Return the installed version of each distribution in the environment of `python`."""
    script = (
        "import importlib.metadata as m, json, sys\n"
        "def version(name):\n"
        "    try:\n"
        "        return m.version(name)\n"
        "    except m.PackageNotFoundError:\n"
        "        return 'not installed'\n"
        "print(json.dumps({name: version(name) for name in sys.argv[1:]}))\n"
    )
    output = subprocess.run([python, "-c", script, *names], check=True, capture_output=True, text=True).stdout
    return json.loads(output)


def _git(*args: str) -> str:
    return subprocess.run(["git", "-C", REPO_DIR, *args], capture_output=True, text=True, check=True).stdout.strip()


def working_tree_commit() -> str:
    """Return the checked-out commit, with "+uncommitted" when tracked files have changes."""
    commit = _git("rev-parse", "HEAD")
    changed = _git("status", "--porcelain", "--untracked-files=no")
    return f"{commit}+uncommitted" if changed else commit


def export_taskvisor(revision: str, destination: str) -> str:
    """Extract the taskvisor sources of a git revision into `destination` and return its full commit id.

    Measuring a committed snapshot keeps a run reproducible while other people edit the
    work tree, where a half-finished change can break the import.
    """
    try:
        commit = _git("rev-parse", "--verify", f"{revision}^{{commit}}")
    except subprocess.CalledProcessError:
        raise SystemExit(f"invalid --taskvisor-rev {revision!r}: no commit has this name; pass a branch, tag or commit id") from None
    os.makedirs(destination, exist_ok=True)
    archive = subprocess.run(["git", "-C", REPO_DIR, "archive", "--format=tar", commit, "setup.py", "supervisor", "worker", "shared"],
                             capture_output=True, check=True).stdout  # fmt: skip
    subprocess.run(["tar", "-x", "-C", destination], input=archive, check=True)
    return commit


def compile_sources(taskvisor_dir: str) -> None:
    """Write the bytecode of taskvisor's packages and of bench/apps before any system starts.

    pip compiles the peers' packages when it installs them, and it compiles an
    installed taskvisor the same way. Where PYTHONDONTWRITEBYTECODE is set, every
    taskvisor start would otherwise compile its sources again: about 60 ms of each
    throughput run's start-up on the 2-core reference machine.
    """
    folders = [os.path.join(taskvisor_dir, name) for name in ("shared", "supervisor", "worker")]
    folders.append(os.path.join(BENCH_DIR, "apps"))
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    subprocess.run([sys.executable, "-m", "compileall", "-q", *folders], env=env, check=True, stdout=subprocess.DEVNULL)


def check_taskvisor_import(taskvisor_dir: str) -> None:
    """Raise SystemExit unless taskvisor's Python imports the supervisor package from `taskvisor_dir`."""
    env = dict(os.environ, PYTHONPATH=taskvisor_dir)
    # The workers run in bench/apps, and `python -m` puts the current folder first on sys.path.
    found = subprocess.run([sys.executable, "-c", "import supervisor; print(supervisor.__file__)"], env=env,
                           cwd=os.path.join(BENCH_DIR, "apps"), capture_output=True, text=True, check=False).stdout.strip()  # fmt: skip
    if not found.startswith(os.path.join(taskvisor_dir, "")):
        raise SystemExit(f"taskvisor's Python imports the supervisor package from {found or 'nowhere'},"
                         f" not from {taskvisor_dir}; uninstall that copy or run with a clean environment")  # fmt: skip


def machine_description() -> dict:
    model = "unknown"
    with open("/proc/cpuinfo", encoding="utf-8") as handle:
        for line in handle:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    memory_kib = 0
    with open("/proc/meminfo", encoding="utf-8") as handle:
        for line in handle:
            if line.startswith("MemTotal:"):
                memory_kib = int(line.split()[1])
                break
    return {
        "cores": os.cpu_count(),
        "memory_gib": round(memory_kib / 1024 / 1024, 1),
        "cpu_model": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


def load_average() -> list[float]:
    return [round(value, 2) for value in os.getloadavg()]


def now_text() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def collect_versions(redis_version: str, taskvisor_commit: str) -> dict:
    versions = {
        "taskvisor_commit": taskvisor_commit,
        "redis_server": redis_version,
        "taskvisor_environment": distribution_versions(sys.executable, TASKVISOR_DISTRIBUTIONS),
    }
    for name, (_folder, _requirements, distributions) in PEER_ENVIRONMENTS.items():
        versions[f"{name}_environment"] = distribution_versions(venv_python(name), distributions)
    return versions
