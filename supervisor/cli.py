"""The `taskvisor` command line: the root group, supervise, demo and db."""

import sys
from importlib.metadata import PackageNotFoundError, version

import click

from shared.errors import ConfigError, TaskvisorError
from shared.logs import LOG_FORMATS, setup_logging
from shared.redaction import redact_url
from shared.settings import Config, apply_overrides, load_config
from supervisor.cli_common import connection_options, fail, store_call
from supervisor.cli_health import health
from supervisor.cli_providers import provider
from supervisor.cli_purge import purge
from supervisor.cli_stats import stats
from supervisor.cli_tasks import cancel, get, list_tasks, retry, submit
from supervisor.cli_top import top


def _version() -> str:
    try:
        return version("taskvisor")
    except PackageNotFoundError:
        return "unknown (not installed)"


# Options of the root command, which click accepts only before a command's name, each
# with an example of its use.
GLOBAL_OPTIONS = {"--log-level": "--log-level DEBUG", "--log-format": "--log-format json", "--version": "--version"}


class RootGroup(click.Group):
    """The root command, whose error shows where a global option goes when it follows a command's name."""

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except click.NoSuchOption as exc:
            example = GLOBAL_OPTIONS.get(exc.option_name)
            if example is None or exc.ctx is None:
                raise
            if exc.option_name == "--version":
                usage = f"{ctx.command_path} --version"
            else:
                command = exc.ctx.command_path[len(ctx.command_path):].strip()
                usage = f"{ctx.command_path} {example} {command} ..."
            message = f"{exc.option_name} is an option of taskvisor itself and goes before the command: {usage}"
            raise click.NoSuchOption(exc.option_name, message=message, ctx=exc.ctx) from None


@click.group(cls=RootGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(_version(), prog_name="taskvisor")
@click.option("--log-level", envvar="TASKVISOR_LOG_LEVEL",
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
              help="Lowest level of log lines written to stderr [default: INFO for supervise and demo, WARNING otherwise;"
                   " env TASKVISOR_LOG_LEVEL].")
@click.option("--log-format", envvar="TASKVISOR_LOG_FORMAT", default="text", show_default=True,
              type=click.Choice(LOG_FORMATS),
              help="Log lines on stderr as plain text, or as one JSON object per line; the supervisor's "
                   "child processes use the same format [env TASKVISOR_LOG_FORMAT].")
@click.pass_context
def cli(context: click.Context, log_level: str | None, log_format: str) -> None:
    """taskvisor: instance operations from Redis streams, run by per-provider worker groups."""
    long_running = context.invoked_subcommand in ("supervise", "demo")
    setup_logging(log_level or ("INFO" if long_running else "WARNING"), log_format)


@cli.command()
@click.option("--config", "config_path", envvar="TASKVISOR_CONFIG", type=click.Path(dir_okay=False),
              required=True, help="YAML config file [env TASKVISOR_CONFIG].")
@click.option("--redis-url", envvar="TASKVISOR_REDIS_URL",
              help="Redis URL; overrides redis.url of the config [env TASKVISOR_REDIS_URL].")
@click.option("--database-url", envvar="TASKVISOR_DATABASE_URL",
              help="sqlite:///path or mysql://user:pass@host:port/db; overrides database.url [env TASKVISOR_DATABASE_URL].")
def supervise(config_path: str, redis_url: str | None, database_url: str | None) -> None:
    """Run the supervisor and its worker groups until SIGTERM or Ctrl-C.

    Provider settings reload from the file on SIGHUP or when the file changes, and
    from Redis when `taskvisor provider` (or a panel) changes them.
    """
    from shared.logs import set_role
    from supervisor.live_config import ConfigWatcher
    from supervisor.main import Supervisor

    try:
        config = apply_overrides(load_config(config_path), redis_url, database_url)
    except ConfigError as exc:
        fail(str(exc))
    set_role("supervisor")
    watcher = ConfigWatcher(config_path, redis_url, database_url)
    try:
        code = Supervisor(config, watcher).run()
    except TaskvisorError as exc:
        fail(str(exc))
    sys.exit(code)


@cli.group()
def db() -> None:
    """Manage the SQL schema."""


@db.command(name="init")
@connection_options(uses_redis=False)
def db_init(config: Config) -> None:
    """Create or upgrade the SQL tables; safe to run more than once."""
    store_call(config, lambda store: store.init_schema(), create=True)
    click.echo(f"schema ready at {redact_url(config.database.url)}")


@cli.command()
@click.option("--data-dir", default="demo-data", show_default=True, type=click.Path(file_okay=False),
              help="Folder for the embedded Redis's append-only file, the SQLite file and the config.")
@click.option("--port", default=6390, show_default=True, type=click.IntRange(1024, 65535),
              help="Loopback port of the embedded Redis.")
@click.option("--tasks", "task_count", default=12, show_default=True, type=click.IntRange(0, 10000),
              help="Size of the demo batch.")
def demo(data_dir: str, port: int, task_count: int) -> None:
    """Start an embedded Redis, SQLite and the example providers, then run a demo batch."""
    from supervisor.demo import run_demo

    try:
        sys.exit(run_demo(data_dir, port, task_count))
    except TaskvisorError as exc:
        fail(str(exc))


cli.add_command(submit)
cli.add_command(get)
cli.add_command(list_tasks)
cli.add_command(cancel)
cli.add_command(retry)
cli.add_command(provider)
cli.add_command(stats)
cli.add_command(health)
cli.add_command(top)
cli.add_command(purge)


def main() -> None:
    cli()
