"""The benchmark command's checks of its options, which run before it installs or starts anything."""

import subprocess
import sys

import pytest

from tests.harness import REPO


def bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "bench" / "run.py"), *args], capture_output=True, text=True,
                          cwd=REPO, timeout=60)  # fmt: skip


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--only", ""], "--only '' names no system; expected names from: taskvisor, taskvisor-mariadb, celery"),
        (["--only", " , "], "--only ' , ' names no system"),
        (["--only", "taskvisr"], "unknown system taskvisr in --only; expected names from: taskvisor,"),
        (["--concurrency", ""], "invalid --concurrency value '': expected whole numbers of 1 or more"),
        (["--scale-tasks", "0"], "invalid --scale-tasks value '0': expected whole numbers of 1 or more"),
        (["--measure", "speed"], "invalid --measure value 'speed': expected names from throughput, latency"),
        (["--tasks", "0"], "invalid --tasks value 0: expected 1 or more"),
        (["--tasks", "-5"], "invalid --tasks value -5: expected 1 or more"),
        (["--runs", "0"], "invalid --runs value 0: expected 1 or more"),
        (["--latency-tasks", "0"], "invalid --latency-tasks value 0: expected 1 or more"),
        (["--interval-ms", "-1"], "invalid --interval-ms value -1: expected a number of milliseconds above 0"),
    ],
)
def test_bench_rejects_bad_option(args, message):
    result = bench("--quick", *args)
    assert result.returncode == 2
    assert message in result.stderr


def test_bench_only_accepts_spaces():
    # The --measure check comes after --only's, so its error shows that --only took both names.
    result = bench("--quick", "--only", "taskvisor, celery", "--measure", "speed")
    assert result.returncode == 2
    assert "invalid --measure value 'speed'" in result.stderr
    assert "unknown system" not in result.stderr
