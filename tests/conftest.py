pytest_plugins = ["tests.fixtures_db", "tests.fixtures_redis", "tests.fixtures_mariadb", "tests.fixtures_supervisor",
                  "tests.fixtures_cluster"]
