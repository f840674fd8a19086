"""The agent's configuration: the TOML file, ``EDGEFLEET_`` variables, options, and the
errors each gives for bad input; and the ``edgefleet agent`` commands that read it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from agent.cli import cli
from agent.config import MAX_CONFIG_BYTES, MAX_ENV_VALUE_BYTES, ConfigError, load_settings

GOOD = """\
[agent]
device_id = "gw-0042"
profile = "x86-gateway-vnni"
data_dir = "/var/lib/edgefleet"
api_port = 8901
tags = ["lab"]

[[agent.health_probes]]
kind = "http"
url = "http://127.0.0.1:9000/ready"
attempts = 2
"""


def write(tmp_path: Path, text: str | bytes, name: str = "agent.toml") -> Path:
    p = tmp_path / name
    if isinstance(text, bytes):
        p.write_bytes(text)
    else:
        p.write_text(text)
    return p


def test_file_values_defaults_and_nested_tables(tmp_path: Path):
    s = load_settings(write(tmp_path, GOOD), environ={})
    assert (s.device_id, s.profile, s.api_port, s.tags) == ("gw-0042", "x86-gateway-vnni", 8901, ["lab"])
    assert s.data_dir == Path("/var/lib/edgefleet")
    assert s.health_probes[0].url == "http://127.0.0.1:9000/ready" and s.health_probes[0].attempts == 2
    assert s.telemetry_interval == 10.0 and s.drift_max_rows_per_s == 200.0  # defaults


def test_a_file_without_an_agent_table_is_read_whole(tmp_path: Path):
    s = load_settings(write(tmp_path, 'device_id = "d1"\nprofile = "rpi4"\ndata_dir = "/d"\n'), environ={})
    assert s.device_id == "d1"


def test_precedence_is_option_then_environment_then_file(tmp_path: Path):
    f = write(tmp_path, GOOD)
    env = {"EDGEFLEET_API_PORT": "81", "EDGEFLEET_DEVICE_ID": "from-env"}
    s = load_settings(f, {"device_id": "from-option", "broker_url": None}, environ=env)
    assert s.device_id == "from-option"  # option beats the environment
    assert s.api_port == 81  # the environment beats the file
    assert s.broker_url == "mqtt://127.0.0.1:1883"  # an unset option (None) falls through


def test_environment_alone_is_enough_and_takes_json_for_lists(tmp_path: Path):
    env = {
        "EDGEFLEET_DEVICE_ID": "d2", "EDGEFLEET_PROFILE": "rpi4", "EDGEFLEET_DATA_DIR": str(tmp_path),
        "edgefleet_telemetry_interval": "2.5",  # names match case-insensitively
        "EDGEFLEET_TAGS": '["a", "b"]',
        "EDGEFLEET_HEALTH_PROBES": '[{"kind": "file", "path": "/run/ready"}]',
        "EDGEFLEET_CAPTURE_UPLOAD": "true",
        "EDGEFLEET_KEY_PASSPHRASE": "the hub's, not ours",  # other programs' variables are left alone
        "PATH": "/usr/bin",
    }
    s = load_settings(None, environ=env)
    assert (s.device_id, s.telemetry_interval, s.tags, s.capture_upload) == ("d2", 2.5, ["a", "b"], True)
    assert s.health_probes[0].path == Path("/run/ready")


def test_load_settings_reads_the_process_environment_by_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("EDGEFLEET_API_PORT", "8123")
    s = load_settings(write(tmp_path, GOOD))
    assert s.api_port == 8123


@pytest.mark.parametrize("env, message", [
    ({"EDGEFLEET_API_PORT": "abc"}, "EDGEFLEET_API_PORT: Input should be a valid integer"),
    ({"EDGEFLEET_API_PORT": "70000"}, "EDGEFLEET_API_PORT: Input should be less than or equal to 65535"),
    ({"EDGEFLEET_TAGS": "lab,floor"}, "EDGEFLEET_TAGS: tags takes JSON"),
    ({"EDGEFLEET_TAGS": '["lab"'}, "EDGEFLEET_TAGS: tags takes JSON"),  # truncated
    ({"EDGEFLEET_HEALTH_PROBES": '[{"kind": "exec"}]'}, "EDGEFLEET_HEALTH_PROBES[0]: Value error, a exec probe needs command"),
    ({"EDGEFLEET_HEALTH_PROBES": '[{"kind": "ping"}]'}, "EDGEFLEET_HEALTH_PROBES[0][kind]: Input should be"),
    ({"EDGEFLEET_DEVICE_ID": "no/slashes"}, "EDGEFLEET_DEVICE_ID: Value error, must be 1-64 characters"),
    ({"EDGEFLEET_TAGS": "[" + '"x",' * MAX_ENV_VALUE_BYTES + '"x"]'}, "over the 65536-byte limit"),
    ({"EDGEFLEET_TAGS": "9" * 5000}, "EDGEFLEET_TAGS: tags takes JSON"),  # past int()'s digit limit
])
def test_a_bad_environment_value_names_the_variable(tmp_path: Path, env: dict[str, str], message: str):
    with pytest.raises(ConfigError) as e:
        load_settings(write(tmp_path, GOOD), environ=env)
    assert message in str(e.value)


@pytest.mark.parametrize("text, message", [
    (GOOD.replace("api_port = 8901", "api_port = 70000"), "agent.toml: api_port: Input should be less than"),
    (GOOD.replace("api_port = 8901", "api_port = 8901\nmystery = 1"), "agent.toml: mystery: Extra inputs are not permitted"),
    (GOOD.replace('device_id = "gw-0042"\n', ""), "device_id: required; set it in "),
    (GOOD.replace('kind = "http"', 'kind = "ping"'), "agent.toml: health_probes[0][kind]: Input should be"),
    (GOOD.replace("api_port = 8901", "capture_per_minute = 1.0\ncapture_max_bytes = 5000"),
     "capture_max_bytes must be at least capture_max_sample_bytes (capture_max_bytes from "),  # across fields
    ("[agent]\ndevice_id = \"gw\nprofile = 1\n", "not valid TOML"),  # unterminated string
    (GOOD[: GOOD.index('["lab"') + 4], "not valid TOML"),  # truncated inside a list
    ("agent = 5\n", "[agent] must be a table"),
    (b"[agent]\ndevice_id = \"\xff\xfe\"\n", "not valid TOML"),  # not UTF-8
    (GOOD.replace("api_port = 8901", "api_port = " + "9" * 5000), "not valid TOML"),  # past the digit limit
    (GOOD.replace("api_port = 8901", "x = " + "[" * 3000 + "]" * 3000), "not valid TOML"),  # nested too deep
    ("", "or --device-id"),
])
def test_a_bad_file_names_the_file_and_the_field(tmp_path: Path, text: str | bytes, message: str):
    with pytest.raises(ConfigError) as e:
        load_settings(write(tmp_path, text), environ={})
    assert message in str(e.value)


def test_an_oversized_or_missing_file_is_refused_before_parsing(tmp_path: Path):
    big = write(tmp_path, GOOD + "#" * MAX_CONFIG_BYTES + "\n")
    with pytest.raises(ConfigError, match="over the 65536-byte limit"):
        load_settings(big, environ={})
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(tmp_path / "absent.toml", environ={})


def test_an_invalid_option_names_the_option(tmp_path: Path):
    with pytest.raises(ConfigError, match=r"^--telemetry-interval: Input should be greater than 0"):
        load_settings(write(tmp_path, GOOD), {"telemetry_interval": 0}, environ={})


def test_agent_run_reports_a_bad_config_and_starts_nothing(tmp_path: Path):
    bad = write(tmp_path, GOOD.replace("api_port = 8901", "api_port = -1"))
    res = CliRunner().invoke(cli, ["agent", "run", "--config", str(bad)], env={"EDGEFLEET_API_PORT": None})
    assert res.exit_code == 1
    assert "agent.toml: api_port: Input should be greater than or equal to 0" in res.output
    assert not (tmp_path / "var").exists()
    res = CliRunner().invoke(cli, ["agent", "run", "--config", str(bad)], env={"EDGEFLEET_API_PORT": "x"})
    assert res.exit_code == 1 and "EDGEFLEET_API_PORT: Input should be a valid integer" in res.output


def test_agent_status_of_a_data_dir_a_device_left(bench):
    """``edgefleet agent status`` reads what a stopped agent left on disk."""
    tp, man, _w, _b = bench.bundle("1.0.0")
    a = bench.agent("status-dev")
    bench.deploy("status-dev", "dep-status", tp, man.ref)
    assert bench.wait_for(a, "dep-status") == "installed"
    a.stop()
    data_dir = a.settings.data_dir
    res = CliRunner().invoke(cli, ["agent", "status", "--data-dir", str(data_dir), "--json"])
    assert res.exit_code == 0, res.output
    st = json.loads(res.output)
    assert st["state"] == "committed" and st["deployment_id"] == "dep-status"
    assert st["model"] == man.ref and st["slots"][st["active_slot"]] == man.ref
    assert st["spool_records"] >= 0 and st["last_error"] is None
    assert "committed" in st["history"]
    res = CliRunner().invoke(cli, ["agent", "status", "--data-dir", str(data_dir)])
    assert res.exit_code == 0 and man.ref in res.output and "committed" in res.output


def test_agent_status_of_a_folder_no_agent_used_says_so_and_writes_nothing(tmp_path: Path):
    (tmp_path / "hub.db").write_bytes(b"")  # e.g. a hub's folder, given by mistake
    res = CliRunner().invoke(cli, ["agent", "status", "--data-dir", str(tmp_path)])
    assert res.exit_code == 1 and "is not an agent's data folder" in res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hub.db"]


@pytest.mark.parametrize("env, message", [
    ({"EDGEFLEET_TELEMETRY_INTERVAL": "inf"}, "EDGEFLEET_TELEMETRY_INTERVAL: Input should be a finite number"),
    ({"EDGEFLEET_HOOK_TIMEOUT": "1e10"}, "EDGEFLEET_HOOK_TIMEOUT: Input should be less than or equal to 86400"),
    ({"EDGEFLEET_TRANSFER_TIMEOUT": "nan"}, "EDGEFLEET_TRANSFER_TIMEOUT: Input should be a finite number"),
    ({"EDGEFLEET_HEALTH_PROBES": '[{"kind": "file", "path": "/r", "timeout_s": 1e300}]'},
     "EDGEFLEET_HEALTH_PROBES[0][timeout_s]: Input should be less than or equal to 3600"),
    ({"EDGEFLEET_DATA_DIR": ""}, "EDGEFLEET_DATA_DIR: Value error, must not be empty"),
    ({"EDGEFLEET_TAGS": "[" * 5000 + "]" * 5000}, "EDGEFLEET_TAGS: tags takes JSON"),  # too deep to parse
    ({"EDGEFLEET_API_PORT": "81", "edgefleet_api_port": "82"}, "both set api_port"),
    ({"EDGEFLEET_BROKER_URL": "127.0.0.1:1883"}, "EDGEFLEET_BROKER_URL: Value error, broker URL must look like"),
    ({"EDGEFLEET_BROKER_URL": "http://hub:1883"}, "broker URL must look like mqtt://host:port"),
    ({"EDGEFLEET_BROKER_URL": "mqtt://hub:99999"}, "EDGEFLEET_BROKER_URL: Value error, broker URL 'mqtt://hub:99999': the port must be a number"),
    ({"EDGEFLEET_BROKER_URL": "mqtt://dev:s3cret@:1883"}, "'mqtt://***@:1883'"),  # no host; the password not shown
    # A '/' in a password ends the user part for urlparse; its own error would quote it.
    ({"EDGEFLEET_BROKER_URL": "mqtt://dev:ab/cd@hub:1883"}, "'mqtt://***@hub:1883': the port must be a number"),
    ({"EDGEFLEET_REPOSITORY_URL": "hub:8080/api/v1/repository/"}, "EDGEFLEET_REPOSITORY_URL: Value error, must be an http"),
    ({"EDGEFLEET_REPOSITORY_URL": "dev:s3cret@hub:8080/api"}, "got '***@hub:8080/api'"),
    ({"EDGEFLEET_REPOSITORY_URL": "http://hub:port/api/"}, "the port must be a number from 0 to 65535"),
])
def test_unusable_values_are_refused_by_name(tmp_path: Path, env: dict[str, str], message: str):
    """Durations must be finite and sane (an infinite wait crashes the thread that waits);
    paths must not be empty; one field, one variable; URLs never echo a password."""
    with pytest.raises(ConfigError) as e:
        load_settings(write(tmp_path, GOOD), environ=env)
    assert message in str(e.value)
    assert not any(secret in str(e.value) for secret in ("s3cret", "ab/cd", "'ab'", "'cd'"))


def test_an_empty_variable_unsets_an_optional_setting(tmp_path: Path):
    text = GOOD.replace("api_port = 8901", 'api_port = 8901\ntrust_root = "/etc/root.json"\nbandwidth_limit = 1e6')
    f = write(tmp_path, text)
    assert load_settings(f, environ={}).trust_root == Path("/etc/root.json")
    s = load_settings(f, environ={"EDGEFLEET_TRUST_ROOT": "", "EDGEFLEET_BANDWIDTH_LIMIT": ""})
    assert s.trust_root is None and s.bandwidth_limit is None


def test_errors_name_the_option_as_the_command_line_spells_it(tmp_path: Path):
    named = tmp_path / "edgefleet_agent.toml"  # a file name that starts like a variable
    named.write_text(GOOD.replace("api_port = 8901", "api_port = 70000"))
    with pytest.raises(ConfigError, match=r"edgefleet_agent.toml: api_port: Input should be less than"):
        load_settings(named, environ={})
    with pytest.raises(ConfigError, match=r"^--broker: Input should be a valid string"):
        load_settings(write(tmp_path, GOOD), {"broker_url": 5}, environ={}, option_names={"broker_url": "--broker"})
    bad = write(tmp_path, GOOD.replace('device_id = "gw-0042"\n', ""))
    res = CliRunner().invoke(cli, ["agent", "run", "--config", str(bad)], env={"EDGEFLEET_DEVICE_ID": None})
    assert res.exit_code == 1 and "EDGEFLEET_DEVICE_ID or --device-id" in res.output
