pytest_plugins = ["tests.fixtures_db", "tests.fixtures_redis", "tests.fixtures_supervisor"]
