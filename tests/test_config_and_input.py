"""Config validation, entry validation and secret masking, without servers."""

import pytest

from shared.errors import ConfigError, InvalidEntry
from shared.redaction import Redactor, redact_url
from shared.schema import parse_entry
from shared.settings import load_config, parse_config

COMMAND = {"type": "command", "commands": {"start": ["/bin/true"]}}


def config_error(document: dict) -> str:
    with pytest.raises(ConfigError) as caught:
        parse_config(document, "taskvisor.yaml", "/etc/taskvisor")
    return str(caught.value)


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({"providers": {"pve-1": {"maxConcurrentTasks": "three", "driver": COMMAND}}},
         "taskvisor.yaml: invalid value at providers.pve-1.maxConcurrentTasks (value 'three'): Expected `int`, got `str`"),
        ({"providers": {"pve-1": {"maxConcurrentTasks": -1, "driver": COMMAND}}},
         "invalid value at providers.pve-1.maxConcurrentTasks (value -1): Expected `int` >= 0"),
        ({"providers": {"pve-1": {"allowConcurentTasks": True, "driver": COMMAND}}},
         "unknown key 'allowConcurentTasks' under providers.pve-1; did you mean 'allowConcurrentTasks'?"),
        ({"providers": {"pve-1": {"timeouts": {"boot": 5}, "driver": COMMAND}}},
         "invalid key under providers.pve-1.timeouts: Invalid enum value 'boot'"),
        ({"providers": {"pve-1": {"timeouts": {"start": 0}, "driver": COMMAND}}},
         "invalid value at providers.pve-1.timeouts"),
        ({"providers": {"pve 1": {"driver": COMMAND}}}, "invalid provider id 'pve 1'"),
        ({"providers": {"pve-1": {}}}, "Object missing required field `driver`"),
        ({"providers": {"pve-1": {"driver": {"type": "command"}}}}, "providers.pve-1.driver.commands is empty"),
        ({"providers": {"pve-1": {"driver": {"type": "command", "commands": {"start": []}}}}},
         "providers.pve-1.driver.commands.start must be a non-empty list"),
        ({"providers": {"pve-1": {"driver": {"type": "command", "commands": {"start": ["x", "--vm={instance}"]}}}}},
         "placeholder '{instance}' in providers.pve-1.driver.commands.start argument '--vm={instance}' must be a whole argument"),
        ({"providers": {"pve-1": {"driver": {"type": "command", "commands": {"start": ["x", "{vm}"]}}}}},
         "unknown placeholder '{vm}'"),
        ({"providers": {"pve-1": {"driver": {"type": "proxmox"}}}},
         "expected 'command' or a Python class as 'module:Class'"),
        ({"redis": {"url": 6379}}, "invalid value at redis.url (value 6379): Expected `str`, got `int`"),
        ({"supervisor": {"shutdownGrace": -1}}, "invalid value at supervisor.shutdownGrace"),
        ({"databse": {"url": "sqlite:///x.db"}}, "unknown key 'databse' under (top level); did you mean 'database'?"),
    ],
)
def test_config_errors_name_key_and_value(document, message):
    assert message in config_error(document)


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found: pass --config with the path of an existing file"):
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
