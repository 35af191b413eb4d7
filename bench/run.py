"""Benchmark taskvisor against Celery, RQ, arq and Dramatiq on one private Redis.

Run it through bench/run, which prepares taskvisor's .venv, or directly with a Python
that can import taskvisor's dependencies:

    bench/run --quick
    /tmp/tv-venv/bin/python bench/run.py --quick --only taskvisor,celery

It starts one redis-server on a free 127.0.0.1 port (no persistence), installs the
peers into bench/.venv-peers and bench/.venv-arq when their requirements changed, runs
the throughput and latency measurements, interleaving the systems in every round,
and writes bench/results/<name>.md and .json. docs/benchmarks.md explains the numbers.
With --measure it runs the cancel, resize, memory and scale measurements as well or
instead. When a throughput run includes the taskvisor-mariadb row, it also starts a
private MariaDB server on a free 127.0.0.1 port.
"""

import argparse
import dataclasses
import json
import os
import shlex
import shutil
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from harness import environment, report
from harness.cancel import measure_cancel
from harness.environment import BENCH_DIR, REPO_DIR
from harness.mariadb_server import PrivateMariadb
from harness.measure import measure_latency, measure_throughput
from harness.memory import measure_memory
from harness.redis_server import PrivateRedis
from harness.resize import measure_resize
from harness.scale import SCALE_SYSTEMS, measure_scale
from harness.systems import SYSTEMS, RunContext

QUICK = {"tasks": 2_000, "rq_fork_tasks": 500, "runs": 2, "latency_tasks": 300, "deadline": 120.0,
         "cancel_repetitions": 20, "resize_repetitions": 3, "memory_providers": 10,
         "concurrency": [2], "scale_tasks": [2_000, 20_000]}  # fmt: skip
FULL = {"tasks": 20_000, "rq_fork_tasks": 20_000, "runs": 3, "latency_tasks": 2_000, "deadline": 1200.0,
        "cancel_repetitions": 50, "resize_repetitions": 5, "memory_providers": 100,
        "concurrency": [2, 16], "scale_tasks": [2_000, 20_000, 200_000]}  # fmt: skip
MEASUREMENTS = ("throughput", "latency", "cancel", "resize", "memory", "scale")
# The systems that have no latency row: rq-fork differs from rq-simple only in the fork per
# job, and taskvisor-mariadb from taskvisor only in the mirror, which a task's start does not wait for.
NO_LATENCY_ROW = ("rq-fork", "taskvisor-mariadb")
# Seconds that the last paced task may take to finish after the producer sent it.
LATENCY_DEADLINE_SECONDS = 30.0
# The resize measurement's backlog: tasks, and seconds that each task runs.
RESIZE_TASKS = 40
RESIZE_TASK_SECONDS = 0.5
# Seconds between two samples of the load average while the command runs.
LOAD_SAMPLE_SECONDS = 5.0


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="2,000 tasks (500 for rq-fork), 2 runs and 300 latency tasks, about 2.5 minutes on 2 cores")
    parser.add_argument("--only", metavar="NAME,...",
                        help=f"systems to run, comma-separated, from: {', '.join(SYSTEMS)} [default: all]")
    parser.add_argument("--measure", default="throughput,latency", metavar="KIND,...",
                        help="measurements to run, comma-separated, from: throughput, latency, cancel, resize,"
                             " memory, scale [default: throughput,latency]")
    parser.add_argument("--concurrency", metavar="N,...",
                        help="total concurrencies of the throughput runs, comma-separated, one table each"
                             " [default: 2 quick, 2,16 full]")
    parser.add_argument("--scale-tasks", metavar="N,...",
                        help="backlog sizes of the scale measurement, comma-separated"
                             " [default: 2000,20000 quick, 2000,20000,200000 full]")
    parser.add_argument("--runs", type=int, help="runs of each measurement [default: 2 quick, 3 full]")
    parser.add_argument("--tasks", type=int, help="backlog size of the throughput runs [default: 2,000 quick, 20,000 full]")
    parser.add_argument("--latency-tasks", type=int, help="tasks of a latency run [default: 300 quick, 2,000 full]")
    parser.add_argument("--interval-ms", type=float, default=10.0, help="milliseconds between two latency tasks [default: 10]")
    parser.add_argument("--cancel-repetitions", type=int, metavar="N",
                        help="cancels per system in the cancel measurement [default: 20 quick, 50 full]")
    parser.add_argument("--resize-repetitions", type=int, metavar="N",
                        help="runs of the resize measurement [default: 3 quick, 5 full]")
    parser.add_argument("--memory-providers", type=int, metavar="N",
                        help="providers of 4 idle workers each in the memory measurement [default: 10 quick, 100 full]")
    parser.add_argument("--taskvisor-rev", default="HEAD", metavar="REV",
                        help="git revision of taskvisor to measure, extracted into bench/scratch [default: HEAD]")
    parser.add_argument("--working-tree", action="store_true",
                        help="measure the work tree as it is, uncommitted changes included, instead of --taskvisor-rev")
    parser.add_argument("--name", default="latest", help="results file name without extension [default: latest]")
    parser.add_argument("--profile", action="store_true",
                        help="profile taskvisor with py-spy during one throughput run instead of benchmarking,"
                             " and write bench/results/profile-<name>.md")
    parser.add_argument("--cpu-only", action="store_true",
                        help="with --profile, measure the CPU of each process without py-spy, which takes CPU of its own")
    arguments = parser.parse_args()
    if arguments.cpu_only and not arguments.profile:
        parser.error("--cpu-only works only with --profile")

    # An empty value (say, from an unset shell variable) is rejected rather than read as "every system".
    names = list(SYSTEMS) if arguments.only is None else [name.strip() for name in arguments.only.split(",") if name.strip()]
    if not names:
        parser.error(f"--only {arguments.only!r} names no system; expected names from: {', '.join(SYSTEMS)}, comma-separated")
    unknown = [name for name in names if name not in SYSTEMS]
    if unknown:
        parser.error(f"unknown system {', '.join(unknown)} in --only; expected names from: {', '.join(SYSTEMS)}")
    arguments.systems = names
    arguments.kinds = arguments.measure.split(",")
    if any(kind not in MEASUREMENTS for kind in arguments.kinds):
        parser.error(f"invalid --measure value {arguments.measure!r}: expected names from {', '.join(MEASUREMENTS)},"
                     " comma-separated")  # fmt: skip
    for option in ("runs", "tasks", "latency_tasks", "cancel_repetitions", "resize_repetitions", "memory_providers"):
        value = getattr(arguments, option)
        if value is not None and value < 1:
            parser.error(f"invalid --{option.replace('_', '-')} value {value}: expected 1 or more")
    if not arguments.interval_ms > 0:
        parser.error(f"invalid --interval-ms value {arguments.interval_ms:g}: expected a number of milliseconds above 0")
    arguments.concurrencies = (
        None if arguments.concurrency is None else parse_counts(parser, "--concurrency", arguments.concurrency)
    )
    arguments.scale_counts = None if arguments.scale_tasks is None else parse_counts(parser, "--scale-tasks", arguments.scale_tasks)
    return arguments


def parse_counts(parser: argparse.ArgumentParser, option: str, text: str) -> list[int]:
    """Parse a comma-separated list of whole numbers of 1 or more, without repeats, in the given order."""
    values: list[int] = []
    for item in text.split(","):
        if not item.strip().isdigit() or int(item) < 1:
            parser.error(f"invalid {option} value {text!r}: expected whole numbers of 1 or more, comma-separated")
        if int(item) not in values:
            values.append(int(item))
    return values


def command_text() -> str:
    """Return the command line as the user typed it. bench/run sets BENCH_LAUNCHER to its own name."""
    launcher = os.environ.get("BENCH_LAUNCHER")
    if launcher:
        return shlex.join([launcher, *sys.argv[1:]])
    script = os.path.relpath(os.path.abspath(sys.argv[0]), REPO_DIR)
    return shlex.join([sys.executable, script, *sys.argv[1:]])


def settings_for(arguments: argparse.Namespace) -> dict:
    defaults = QUICK if arguments.quick else FULL
    tasks = arguments.tasks or defaults["tasks"]
    return {
        "tasks": tasks,
        "rq_fork_tasks": min(tasks, defaults["rq_fork_tasks"]) if not arguments.tasks else tasks,
        "runs": arguments.runs or defaults["runs"],
        "latency_tasks": arguments.latency_tasks or defaults["latency_tasks"],
        "interval_ms": arguments.interval_ms,
        "deadline_seconds": defaults["deadline"],
        "systems": arguments.systems,
        "measurements": arguments.kinds,
        "cancel_repetitions": arguments.cancel_repetitions or defaults["cancel_repetitions"],
        "resize_repetitions": arguments.resize_repetitions or defaults["resize_repetitions"],
        "resize_tasks": RESIZE_TASKS,
        "resize_task_seconds": RESIZE_TASK_SECONDS,
        "memory_providers": arguments.memory_providers or defaults["memory_providers"],
        "concurrency": arguments.concurrencies or defaults["concurrency"],
        "scale_tasks": arguments.scale_counts or defaults["scale_tasks"],
    }


def progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def needs_mariadb(settings: dict) -> bool:
    return "throughput" in settings["measurements"] and "taskvisor-mariadb" in settings["systems"]


def run_benchmarks(server: PrivateRedis, mariadb: PrivateMariadb | None, scratch: str, taskvisor_dir: str,
                   settings: dict) -> dict:  # fmt: skip
    """Run every selected measurement, rounds outermost, so that load changes hit all systems alike."""
    results: dict = {}
    context = RunContext(server.url, scratch, taskvisor_dir, mariadb=mariadb)
    if "throughput" in settings["measurements"]:
        # One table per concurrency, keyed by the concurrency as text (JSON keys are strings).
        results["throughput"] = {str(concurrency): {} for concurrency in settings["concurrency"]}
        for round_number in range(1, settings["runs"] + 1):
            for concurrency in settings["concurrency"]:
                table = results["throughput"][str(concurrency)]
                throughput_context = dataclasses.replace(context, concurrency=concurrency,
                                                         label=f"throughput-c{concurrency}-{round_number}")  # fmt: skip
                for name in settings["systems"]:
                    system = SYSTEMS[name]
                    count = settings["rq_fork_tasks"] if name == "rq-fork" else settings["tasks"]
                    summary = table.setdefault(name, {"tasks": count, "concurrency": concurrency,
                                                      "description": system.describe(concurrency), "runs": []})  # fmt: skip
                    run = measure_throughput(server, system, throughput_context, count, settings["deadline_seconds"])
                    summary["runs"].append(run)
                    lag = run.get("mirror", {}).get("lag_max_seconds")
                    progress(f"throughput c{concurrency} {name} run {round_number}:"
                             f" {run.get('tasks_per_second', run.get('error'))} tasks/s"
                             + (f" mirror lag max {lag} s" if lag is not None else "")
                             + f" load={run['load_average_before'][0]}")  # fmt: skip
    if "latency" in settings["measurements"]:
        results["latency"] = {}
        for round_number in range(1, settings["runs"] + 1):
            for name in settings["systems"]:
                if name in NO_LATENCY_ROW:
                    continue
                system = SYSTEMS[name]
                summary = results["latency"].setdefault(
                    name, {"tasks": settings["latency_tasks"], "description": system.description, "runs": []})
                context.label = f"latency-{round_number}"
                run = measure_latency(server, system, context, settings["latency_tasks"], settings["interval_ms"],
                                      LATENCY_DEADLINE_SECONDS)  # fmt: skip
                summary["runs"].append(run)
                progress(f"latency {name} run {round_number}: p50={run.get('p50_ms')} ms p99={run.get('p99_ms')} ms"
                         f" {run.get('error', '')} load={run.get('load_average_before', ['-'])[0]}")  # fmt: skip
    if "cancel" in settings["measurements"]:
        results["cancel"] = measure_cancel(server, context, settings["systems"], settings["cancel_repetitions"], progress)
    # Resize and memory measure taskvisor alone.
    if "resize" in settings["measurements"] and "taskvisor" in settings["systems"]:
        results["resize"] = measure_resize(server, context, settings["resize_repetitions"], settings["resize_tasks"],
                                           settings["resize_task_seconds"], progress)  # fmt: skip
    if "memory" in settings["measurements"] and "taskvisor" in settings["systems"]:
        results["memory"] = measure_memory(server, context, settings["memory_providers"], progress)
    if "scale" in settings["measurements"]:
        results["scale"] = measure_scale(server, context, settings["systems"], settings["scale_tasks"],
                                         settings["deadline_seconds"], progress)  # fmt: skip
    return results


class LoadSampler:
    """A daemon thread that records the 1-minute load average every LOAD_SAMPLE_SECONDS, so the report can give the highest."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self.run, name="load-sampler", daemon=True)

    def run(self) -> None:
        while True:
            self.samples.append(environment.load_average()[0])
            if self.stopped.wait(LOAD_SAMPLE_SECONDS):
                return

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> list[float]:
        self.stopped.set()
        self.thread.join()
        return self.samples


def main() -> int:
    arguments = parse_arguments()
    # The wall time and the date include the peers' installs and the source export.
    began = time.perf_counter()
    started = environment.now_text()
    settings = settings_for(arguments)
    environment.ensure_peer_environments()
    scratch = os.path.join(BENCH_DIR, "scratch", arguments.name)
    shutil.rmtree(scratch, ignore_errors=True)
    os.makedirs(scratch)
    if arguments.working_tree:
        taskvisor_dir = REPO_DIR
        commit = environment.working_tree_commit()
    else:
        taskvisor_dir = os.path.join(scratch, "taskvisor-src")
        commit = environment.export_taskvisor(arguments.taskvisor_rev, taskvisor_dir)
    environment.compile_sources(taskvisor_dir)
    environment.check_taskvisor_import(taskvisor_dir)

    sampler = LoadSampler()
    sampler.start()
    server = PrivateRedis(os.path.join(scratch, "redis"))
    mariadb = PrivateMariadb(os.path.join(scratch, "mariadb")) if needs_mariadb(settings) and not arguments.profile else None
    server.start()
    try:
        if mariadb is not None:
            mariadb.start()
        results = {
            "date": started,
            "mode": "quick" if arguments.quick else "full",
            "command": command_text(),
            "machine": environment.machine_description(),
            "versions": environment.collect_versions(server.version(), commit),
            "load_average_start": environment.load_average(),
            "settings": settings,
        }
        progress(f"private redis-server {results['versions']['redis_server']} on {server.url}; scratch {scratch}")
        if mariadb is not None:
            results["versions"]["mariadb_server"] = mariadb.version()
            progress(f"private mariadbd {results['versions']['mariadb_server']} on 127.0.0.1:{mariadb.port}")
        if arguments.profile:
            from harness.profiling import profile_taskvisor

            output_path = os.path.join(BENCH_DIR, "results", f"profile-{arguments.name}.md")
            profile_context = RunContext(server.url, scratch, taskvisor_dir, concurrency=settings["concurrency"][0])
            profile_taskvisor(server, profile_context, settings["tasks"], output_path, results,
                              sample=not arguments.cpu_only)
            return 0
        results.update(run_benchmarks(server, mariadb, scratch, taskvisor_dir, settings))
    finally:
        if mariadb is not None:
            mariadb.stop()
        server.stop()
        samples = sampler.stop()
    results["load_average_end"] = environment.load_average()
    results["load_average_highest"] = max(samples)
    results["load_average_samples"] = len(samples)
    results["total_seconds"] = round(time.perf_counter() - began, 1)
    results["notes"] = notes_for(settings)
    report.summarize(results)

    text = report.markdown(results)
    results_dir = os.path.join(BENCH_DIR, "results")
    os.makedirs(results_dir, exist_ok=True)
    with open(os.path.join(results_dir, f"{arguments.name}.md"), "w", encoding="utf-8") as handle:
        handle.write(text)
    with open(os.path.join(results_dir, f"{arguments.name}.json"), "w", encoding="utf-8") as handle:
        json.dump(results, handle, indent=2)
        handle.write("\n")
    print(text)
    return 0


def notes_for(settings: dict) -> list[str]:
    notes = []
    if settings["rq_fork_tasks"] != settings["tasks"] and "rq-fork" in settings["systems"] and "throughput" in settings["measurements"]:
        notes.append(f"rq-fork drains {settings['rq_fork_tasks']:,} tasks instead of {settings['tasks']:,}, because it"
                     " forks one process per job; compare its tasks/s, not its seconds.")  # fmt: skip
    if "latency" in settings["measurements"] and "rq-fork" in settings["systems"]:
        notes.append("rq-fork has no latency row: it differs from rq-simple only in the fork per job.")
    if "latency" in settings["measurements"] and "taskvisor-mariadb" in settings["systems"]:
        notes.append("taskvisor-mariadb has no latency row: it differs from taskvisor only in the SQL mirror, which"
                     " a task's start does not wait for.")  # fmt: skip
    if "scale" in settings["measurements"] and not any(name in settings["systems"] for name in SCALE_SYSTEMS):
        notes.append(f"The scale measurement did not run: it measures {' and '.join(SCALE_SYSTEMS)}, which --only left out.")
    notes.append("Every system runs at the log level its command line uses by default, writing to a file in bench/scratch.")
    if ("resize" in settings["measurements"] or "memory" in settings["measurements"]) and "taskvisor" not in settings["systems"]:
        notes.append("The resize and memory measurements did not run: they measure taskvisor, which --only left out.")
    return notes


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        # The private servers and the workers were stopped on the way out.
        print("bench/run interrupted; no report written", file=sys.stderr)
        sys.exit(130)
