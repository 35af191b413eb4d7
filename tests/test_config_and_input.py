"""Config validation, entry validation and secret masking, without servers."""

import pytest

from shared.errors import ConfigError, InvalidEntry
from shared.redaction import Redactor, redact_url
from shared.schema import parse_entry
from shared.settings import apply_overrides, load_config, parse_config
from shared.store import ACCEPTED_FORMS

COMMAND = {"type": "command", "commands": {"start": ["/bin/true"]}}


def config_error(document: dict) -> str:
    with pytest.raises(ConfigError) as caught:
        parse_config(document, "taskvisor.yaml", "/etc/taskvisor")
    return str(caught.value)


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({"providers": {"pve-1": {"maxConcurrentTasks": "three", "driver": COMMAND}}},
         "taskvisor.yaml: invalid value at providers.pve-1.maxConcurrentTasks (value 'three'): expected an integer, got a string"),
        ({"providers": {"pve-1": {"maxConcurrentTasks": -1, "driver": COMMAND}}},
         "invalid value at providers.pve-1.maxConcurrentTasks (value -1): expected an integer of at least 0"),
        ({"providers": {"pve-1": {"allowConcurentTasks": True, "driver": COMMAND}}},
         "unknown key 'allowConcurentTasks' under providers.pve-1; did you mean 'allowConcurrentTasks'?"),
        ({"providers": {"pve-1": {"timeouts": {"boot": 5}, "driver": COMMAND}}},
         "unknown task type 'boot' at providers.pve-1.timeouts.boot (value 5): allowed task types are create, start,"),
        ({"providers": {"pve-1": {"timeouts": {"start": 0}, "driver": COMMAND}}},
         "invalid value at providers.pve-1.timeouts.start (value 0): expected a number greater than 0"),
        ({"providers": {"pve 1": {"driver": COMMAND}}}, "invalid provider id 'pve 1'"),
        ({"providers": {"pve-1": {}}}, "invalid value at providers.pve-1 (value {}): missing required key 'driver'"),
        ({"providers": {"pve-1": {"driver": {"type": "command"}}}}, "providers.pve-1.driver.commands is empty"),
        ({"providers": {"pve-1": {"driver": {"type": "command", "commands": {"start": []}}}}},
         "providers.pve-1.driver.commands.start must be a non-empty list"),
        ({"providers": {"pve-1": {"driver": {"type": "command", "commands": {"start": ["x", "--vm={instance}"]}}}}},
         "placeholder '{instance}' in providers.pve-1.driver.commands.start argument '--vm={instance}' must be a whole argument"),
        ({"providers": {"pve-1": {"driver": {"type": "command", "commands": {"start": ["x", "{vm}"]}}}}},
         "unknown placeholder '{vm}'"),
        ({"providers": {"pve-1": {"driver": {"type": "proxmox"}}}},
         "expected 'command' or a Python class as 'module:Class'"),
        ({"redis": {"url": 6379}}, "invalid value at redis.url (value 6379): expected a string, got an integer"),
        ({"supervisor": {"shutdownGrace": -1}}, "invalid value at supervisor.shutdownGrace"),
        ({"databse": {"url": "sqlite:///x.db"}}, "unknown key 'databse' at the top level; did you mean 'database'?"),
    ],
)
def test_config_errors_name_key_and_value(document, message):
    assert message in config_error(document)


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found: check --config or TASKVISOR_CONFIG"):
        load_config(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("providers: [unclosed\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(broken)


def test_config_defaults(tmp_path):
    path = tmp_path / "taskvisor.yaml"
    path.write_text("providers:\n  pve-1:\n    driver: {type: command, commands: {start: [/bin/true]}}\n")
    config = load_config(path)
    provider = config.providers["pve-1"]
    assert provider.group_size == 1
    assert provider.timeout_for("create") == 1800
    assert provider.timeout_for("reset-password") == 600
    assert config.database.url == "sqlite:///taskvisor.db"
    assert config.base_dir == str(tmp_path)
    assert config.supervisor.name


def test_concurrent_group_size():
    config = parse_config(
        {"providers": {"p": {"allowConcurrentTasks": True, "maxConcurrentTasks": 4, "timeouts": {"create": 60},
                             "driver": COMMAND}}}, "x", "/")  # fmt: skip
    assert config.providers["p"].group_size == 4
    assert config.providers["p"].timeout_for("create") == 60


ENTRY = {"type": "start", "instance": "vm-1", "user": "u"}


def test_entry_defaults():
    spec = parse_entry("pve-1", "1700000000000-3", {b"type": b"create", b"user": b"42"})
    assert spec.id == "pve-1:1700000000000-3"
    assert spec.instance == ""
    assert spec.timeout is None
    assert spec.data == {}


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"id": "x" * 65}, "field 'id' has invalid value"),
        ({"timeout": "604801"}, "at most 604800 seconds"),
        ({"timeout": "inf"}, "expected a positive number of seconds"),
        ({"timeout": "1e3"}, "written as plain digits with at most 6 after one '.' (no sign, exponent or spaces)"),
        ({"data": '"text"'}, "field 'data' must be a JSON object, got str"),
        ({"data": '{"pad": "' + "x" * 70000 + '"}'}, "field 'data' is larger than the limit of 65536 bytes"),
        ({"user": "bob smith"}, "field 'user' has invalid value 'bob smith'"),
    ],
)
def test_entry_rejections(extra, message):
    with pytest.raises(InvalidEntry) as caught:
        parse_entry("p", "1-0", {**ENTRY, **extra})
    assert message in str(caught.value)


def test_redactor_masks_nested_and_extra_fields():
    redactor = Redactor(["ssh_key"])
    data = {"root_password": "abc12345", "nested": [{"api_TOKEN": "tok-9999"}], "ssh_key": "AAAAkey", "plan": "2c"}
    assert redactor.redact(data) == {"root_password": "***", "nested": [{"api_TOKEN": "***"}], "ssh_key": "***", "plan": "2c"}
    secrets = redactor.secret_values(data)
    assert Redactor.scrub("set abc12345 with tok-9999 and AAAAkey", secrets) == "set *** with *** and ***"


def test_redact_url_hides_password():
    assert redact_url("mysql://panel:s3cr@t@db:3306/panel") == "mysql://panel:***@db:3306/panel"
    assert redact_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"


REDIS_URL_RULE = (
    "expected a URL that starts with redis://, rediss://, unix://, redis+sentinel:// or redis+cluster://,"
    " such as redis://127.0.0.1:6379/0 (see the redis section of docs/configuration.md)"
)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redsi://127.0.0.1:6390/0", "'redsi://127.0.0.1:6390/0'"),
        ("127.0.0.1:6390", "'127.0.0.1:6390'"),
        ("redsi://:hunter2@127.0.0.1:6390/0", "'redsi://:***@127.0.0.1:6390/0'"),
        ("panel:hunter2@127.0.0.1:6390", "'panel:***@127.0.0.1:6390'"),
    ],
)
def test_redis_url_scheme_rejected(url, shown):
    message = config_error({"redis": {"url": url}})
    assert message == f"taskvisor.yaml: invalid value at redis.url (value {shown}): {REDIS_URL_RULE}"
    assert "hunter2" not in message


@pytest.mark.parametrize("url", ["redis://127.0.0.1:6379/0", "REDIS://127.0.0.1/2", "rediss://:pw@127.0.0.1:6380/0",
                                 "unix:///run/redis/redis.sock?db=1"])  # fmt: skip
def test_redis_url_schemes_accepted(url):
    assert parse_config({"redis": {"url": url}}, "taskvisor.yaml", "/etc/taskvisor").redis.url == url


def test_redis_url_port_checked():
    message = config_error({"redis": {"url": "redis://127.0.0.1:63a0/0"}})
    assert message.startswith("taskvisor.yaml: invalid value at redis.url (value 'redis://127.0.0.1:63a0/0'): ")
    assert "'63a0'" in message


@pytest.mark.parametrize("url", ["postgres://panel:hunter2@127.0.0.1/panel", "sqlite://taskvisor.db", "taskvisor.db"])
def test_database_url_scheme_rejected(url):
    message = config_error({"database": {"url": url}})
    assert message.startswith(f"taskvisor.yaml: invalid value at database.url (value '{redact_url(url)}'): ")
    assert message.endswith(f"expected one of these forms: {ACCEPTED_FORMS}")
    assert "hunter2" not in message


@pytest.mark.parametrize("url", ["sqlite:///taskvisor.db", "sqlite:////var/lib/taskvisor.db", "SQLite:///x.db",
                                 "mysql://panel@127.0.0.1/panel", "mariadb://panel:pw@127.0.0.1:3306/panel"])  # fmt: skip
def test_database_url_schemes_accepted(url):
    assert parse_config({"database": {"url": url}}, "taskvisor.yaml", "/etc/taskvisor").database.url == url


def test_url_overrides_validated():
    config = parse_config({}, "taskvisor.yaml", "/etc/taskvisor")
    with pytest.raises(ConfigError) as caught:
        apply_overrides(config, redis_url="127.0.0.1:6390")
    assert str(caught.value) == f"invalid value of --redis-url or TASKVISOR_REDIS_URL (value '127.0.0.1:6390'): {REDIS_URL_RULE}"

    with pytest.raises(ConfigError) as caught:
        apply_overrides(config, database_url="postgres://panel:hunter2@127.0.0.1/panel")
    message = str(caught.value)
    assert message.startswith("invalid value of --database-url or TASKVISOR_DATABASE_URL (value 'postgres://panel:***@127.0.0.1/panel'): ")
    assert message.endswith(ACCEPTED_FORMS)

    changed = apply_overrides(config, redis_url="redis://127.0.0.1:6390/1", database_url="sqlite:///other.db")
    assert changed.redis.url == "redis://127.0.0.1:6390/1"
    assert changed.database.url == "sqlite:///other.db"


def test_yaml_error_names_file_line_column(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text('redis: {url: "x"\n')
    with pytest.raises(ConfigError) as caught:
        load_config(broken)
    message = str(caught.value)
    assert message.startswith(f"config file {broken} is not valid YAML: ")
    assert f'in "{broken}", line 1, column 8' in message
    assert f'in "{broken}", line 2, column 1' in message
    assert "<unicode string>" not in message


def test_yaml_reader_error_names_file(tmp_path):
    broken = tmp_path / "control.yaml"
    broken.write_text("redis: \x07\n")
    with pytest.raises(ConfigError) as caught:
        load_config(broken)
    assert f'"{broken}", position 7' in str(caught.value)


def test_missing_file_names_both_sources(tmp_path):
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path / "missing.yaml")
    assert str(caught.value) == f"config file {tmp_path / 'missing.yaml'} not found: check --config or TASKVISOR_CONFIG"


@pytest.mark.parametrize(
    ("timeouts", "message"),
    [
        ({"create": -1}, "invalid value at providers.pve-1.timeouts.create (value -1): expected a number greater than 0"),
        ({"start": 60, "stop": "fast"},
         "invalid value at providers.pve-1.timeouts.stop (value 'fast'): expected a number, got a string"),
        ({"delete": 604801}, "invalid value at providers.pve-1.timeouts.delete (value 604801): expected a number of at most 604800"),
        ({"reset": None}, "invalid value at providers.pve-1.timeouts.reset (value None): expected a number, got null"),
        ({"strat": 5},
         ("unknown task type 'strat' at providers.pve-1.timeouts.strat (value 5): allowed task types are "
          "create, start, stop, restart, delete, reset, reset-password; did you mean 'start'?")),
    ],
)
def test_timeouts_errors_name_exact_key(timeouts, message):
    assert config_error({"providers": {"pve-1": {"timeouts": timeouts, "driver": COMMAND}}}) == f"taskvisor.yaml: {message}"


@pytest.mark.parametrize(
    ("driver", "message"),
    [
        ({**COMMAND, "env": {"RETRIES": 3}},
         "invalid value at providers.pve-1.driver.env.RETRIES (value 3): expected a string, got an integer"),
        ({**COMMAND, "env": {3: "x"}}, "invalid key 3 under providers.pve-1.driver.env: expected a string, got an integer"),
        ({"type": "command", "commands": {"start": ["/bin/true", 5]}},
         "invalid value at providers.pve-1.driver.commands.start[1] (value 5): expected a string, got an integer"),
        ({"type": "command", "commands": {"start": "/bin/true"}},
         "invalid value at providers.pve-1.driver.commands.start (value '/bin/true'): expected a list, got a string"),
    ],
)
def test_driver_mapping_errors_name_exact_key(driver, message):
    assert config_error({"providers": {"pve-1": {"driver": driver}}}) == f"taskvisor.yaml: {message}"


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({"providers": {"pve-1": {"maxConcurrentTasks": 2.5, "driver": COMMAND}}},
         "invalid value at providers.pve-1.maxConcurrentTasks (value 2.5): expected an integer, got a decimal number"),
        ({"providers": {"pve-1": {"allowConcurrentTasks": "yes", "driver": COMMAND}}},
         "invalid value at providers.pve-1.allowConcurrentTasks (value 'yes'): expected true or false, got a string"),
        ({"providers": {"pve-1": {"driver": {**COMMAND, "workdir": 5}}}},
         "invalid value at providers.pve-1.driver.workdir (value 5): expected a string or null, got an integer"),
        ({"supervisor": {"leaseSeconds": 1}}, "invalid value at supervisor.leaseSeconds (value 1): expected a number of at least 3"),
        ({"redis": {"prefix": "task visor"}},
         ("invalid value at redis.prefix (value 'task visor'): expected a string matching the regular expression "
          "'^[A-Za-z0-9._:-]{1,64}$'")),
        ({"secretFields": "apikey"}, "invalid value at secretFields (value 'apikey'): expected a list, got a string"),
        ({"baseDir": "/tmp"}, "unknown key 'baseDir' at the top level"),
    ],
)
def test_type_errors_in_plain_english(document, message):
    assert config_error(document) == f"taskvisor.yaml: {message}"
