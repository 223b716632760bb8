"""Settings: flags over environment over the config file over defaults; clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgefn.config import load_settings
from edgefn.errors import ConfigError


def test_settings_precedence_flags_over_env_over_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    config = tmp_path / "edgefn.toml"
    config.write_text('broker = "mqtt://file-host:1111"\nusername = "file-user"\nmetrics_port = 9001\n')
    monkeypatch.setenv("EDGEFN_USERNAME", "env-user")
    monkeypatch.setenv("EDGEFN_PASSWORD", "s3cret")
    s = load_settings(config, broker="mqtt://flag-host:2222")
    assert (s.broker_host, s.broker_port) == ("flag-host", 2222)
    assert s.username == "env-user"
    assert s.metrics_port == 9001
    assert s.password is not None and s.password.get_secret_value() == "s3cret"
    assert "s3cret" not in repr(s)


def test_settings_tls_from_scheme_or_ca(tmp_path: Path):
    assert not load_settings(broker="mqtt://h").tls
    s = load_settings(broker="mqtts://h")
    assert s.tls and s.broker_port == 8883
    assert load_settings(broker="mqtt://h", ca_file=tmp_path / "ca.pem").tls


@pytest.mark.parametrize("url", ["http://h:1", "h:1883", "mqtt://", "tcp://h"])
def test_settings_bad_broker_url_is_a_config_error(url: str):
    with pytest.raises(ConfigError, match="mqtt://HOST:PORT"):
        load_settings(broker=url)


def test_settings_unknown_key_in_file_is_named(tmp_path: Path):
    config = tmp_path / "edgefn.toml"
    config.write_text('brokr = "mqtt://h"\n')
    with pytest.raises(ConfigError, match="brokr"):
        load_settings(config)


def test_settings_missing_config_file(tmp_path: Path):
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "nope.toml")


def test_settings_lists_and_maps_come_from_the_environment_as_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("EDGEFN_MODEL_VARIANTS", '{"digits": "tflite-int8"}')
    monkeypatch.setenv("EDGEFN_FUNCTIONS", f'["{tmp_path / "a"}", "{tmp_path / "b"}"]')
    monkeypatch.setenv("EDGEFN_METRICS_PORT", "9108")
    monkeypatch.setenv("edgefn_metering", "false")  # any case, as the environment may spell it
    monkeypatch.setenv("EDGEFN_NOT_A_SETTING", "1")  # other EDGEFN_ variables are not settings
    s = load_settings()
    assert s.model_variants == {"digits": "tflite-int8"}
    assert s.functions == [tmp_path / "a", tmp_path / "b"]
    assert (s.metrics_port, s.metering) == (9108, False)


def test_settings_say_which_variable_is_not_json(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("EDGEFN_MODEL_VARIANTS", "digits=tflite-int8")
    with pytest.raises(ConfigError, match="EDGEFN_MODEL_VARIANTS: not JSON"):
        load_settings()


def test_settings_say_the_config_file_is_not_toml(tmp_path: Path):
    config = tmp_path / "edgefn.toml"
    config.write_text('broker = "mqtt://h\n')
    with pytest.raises(ConfigError, match="edgefn.toml: invalid TOML"):
        load_settings(config)


def test_settings_refuse_a_bad_value_from_the_environment_by_name(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("EDGEFN_METRICS_PORT", "ninety")
    with pytest.raises(ConfigError, match="metrics_port"):
        load_settings()
