"""A fixture that starts real supervisors and kills whatever they left when the test ends."""

import pytest

from tests.harness import SupervisorProcess


@pytest.fixture
def start_supervisor(tmp_path, redis_server, sqlite_url):
    """Return a function that starts `taskvisor supervise` for the given providers.

    The supervisor uses the test's private Redis and, unless `database_url` is given,
    its SQLite file; other keyword arguments go to the config's `supervisor` section.
    """
    started: list[SupervisorProcess] = []

    def start(providers: dict, database_url: str | None = None, **settings) -> SupervisorProcess:
        supervisor = SupervisorProcess(tmp_path, redis_server.url, database_url or sqlite_url, providers, **settings)
        supervisor.start()
        started.append(supervisor)
        return supervisor

    yield start
    for supervisor in started:
        supervisor.kill_all()
