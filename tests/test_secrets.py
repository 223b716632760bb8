"""No secret in any log line: the daemon and the fleet server run as their commands do, at debug level,
with a secret in every place one can be given (a password in the broker URL and in the cloud URL, the
device's fleet token, the operator's token, the cloud endpoint's header), and each is used, never
printed. A password in a URL logs in; one where the URL cannot carry it is refused without being echoed."""

from __future__ import annotations

import base64
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from typer.testing import CliRunner

from edgefn.childproc import stop_gracefully
from edgefn.cli.main import app
from edgefn.config import load_settings, redact_url
from edgefn.errors import ConfigError
from edgefn.fleet.signing import init_keys, init_operator_token, metadata_dir
from edgefn.mqtt.local_broker import LocalBroker, free_port
from edgefn.protocol.fleet import API
from tests.conftest import MODELS, Collector, publish

BROKER_PASSWORD = "broker-pw-7Qx!z"  # '!' and the like: quoted in the URL, used unquoted
CLOUD_PASSWORD = "cloud-pw-K2m9"


def _drain_into(pipe: Any, lines: list[str]) -> None:
    with pipe:
        for line in pipe:
            lines.append(line)


class Process:
    """A command of ours, its stderr (the log) kept line by line."""

    def __init__(self, args: list[str], env: dict[str, str]):
        self.lines: list[str] = []
        self.proc = subprocess.Popen([sys.executable, "-m", "edgefn", *args], stderr=subprocess.PIPE,
                                     stdout=subprocess.DEVNULL, text=True,
                                     env={**os.environ, "COLUMNS": "400", **env})
        threading.Thread(target=_drain_into, args=(self.proc.stderr, self.lines), daemon=True).start()

    def wait_for(self, pattern: str, timeout: float = 60.0) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if found := re.search(pattern, line):
                    return found
            assert self.proc.poll() is None, "".join(self.lines)[-3000:]
            time.sleep(0.05)
        raise AssertionError(f"no {pattern!r} in: {''.join(self.lines)[-3000:]}")

    def stop(self) -> str:
        stop_gracefully(self.proc, 30)
        time.sleep(0.2)  # the reader thread takes the last lines
        return "".join(self.lines)


@pytest.fixture()
def password_broker(tmp_path: Path):
    """A broker whose second listener takes user `device` with its password only."""
    passwords = tmp_path / "passwords"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(passwords), "device", BROKER_PASSWORD], check=True)
    passwords.chmod(0o600)
    port = free_port()
    with LocalBroker(extra_config=f"listener {port} 127.0.0.1\nallow_anonymous false\n"
                                  f"password_file {passwords}\n") as broker:
        broker.password_port = port
        yield broker


def test_every_secret_is_used_and_none_is_logged(password_broker: LocalBroker, digits_fn: Path, tmp_path: Path,
                                                 component_cache: Path):
    ops = tmp_path / "ops"
    init_keys(ops)
    operator = init_operator_token(ops).read_text().strip()
    basic = base64.b64encode(f"cloud:{CLOUD_PASSWORD}".encode()).decode()
    server = Process(["cloud", "serve", "--data", str(tmp_path / "data"), "--models", str(MODELS), "--port", "0",
                      "--fleet-root", str(metadata_dir(ops) / "1.root.json"), "--token-file",
                      str(ops / "operator.token"), "--auth-header", "Authorization", "--auth-env", "CLOUD_AUTH",
                      "--log-level", "debug"], {"CLOUD_AUTH": f"Basic {basic}"})
    daemon = None
    try:
        url = server.wait_for(r"serving the fleet and .* on (http://\S+)").group(1)
        enrolled = httpx.post(f"{url}{API}/enrollments", json={"device_id": "d1", "group": "lab"},
                              headers={"Authorization": f"Bearer {operator}"}, timeout=10)
        device_token = enrolled.json()["token"]
        token_file = tmp_path / "d1.token"
        token_file.write_text(device_token + "\n")
        state = tmp_path / "state"
        state.mkdir()
        (state / "components").symlink_to(component_cache, target_is_directory=True)
        cloud = url.replace("http://", f"http://cloud:{CLOUD_PASSWORD}@")
        results = Collector(password_broker.port, "results/+/digits")
        daemon = Process(["run", "--broker", f"mqtt://device:{quote(BROKER_PASSWORD)}@127.0.0.1:"
                                             f"{password_broker.password_port}",
                          "--functions", str(digits_fn), "--models", str(MODELS), "--state-dir", str(state),
                          "--no-build", "--cloud", cloud, "--offload", "always", "--fleet", url,
                          "--device-id", "d1", "--group", "lab", "--fleet-root", str(metadata_dir(ops) / "1.root.json"),
                          "--device-token-file", str(token_file), "--fleet-poll", "0.2", "--log-level", "debug"], {})
        daemon.wait_for(r"connected to mqtt://127\.0\.0\.1")  # the URL's password logged in
        time.sleep(0.5)  # subscribed
        publish(password_broker.port, "sensors/dev1/digits",
                [b'{"id": "s%d", "pixels": [%s]}' % (i, b",".join([b"8"] * 64)) for i in range(3)])
        answers = results.wait_for(3, timeout=30)
        results.close()
        assert len(answers) == 3 and all(body["ran_on"] == "cloud" for _, body in answers), answers  # its password
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # the device's token let it report
            devices = httpx.get(f"{url}{API}/devices", timeout=10).json()["devices"]
            if [d["id"] for d in devices] == ["d1"]:
                break
            time.sleep(0.2)
        else:
            raise AssertionError(f"d1 never reported: {''.join(daemon.lines)[-2000:]}")
    finally:
        logs = (daemon.stop() if daemon else "") + server.stop()
    assert "DEBUG" in logs  # the test reads debug-level logs
    secrets = {"broker password": BROKER_PASSWORD, "its URL form": quote(BROKER_PASSWORD),
               "cloud password": CLOUD_PASSWORD, "cloud basic auth": basic, "device token": device_token,
               "operator token": operator}
    leaked = [name for name, secret in secrets.items() if secret in logs]
    assert not leaked, f"{leaked} in the logs"


def test_a_password_where_it_cannot_be_used_is_refused_without_echoing_it():
    with pytest.raises(ConfigError) as refused:
        load_settings(broker="mqtt://:only-a-password@127.0.0.1")
    assert "only-a-password" not in str(refused.value)
    with pytest.raises(ConfigError) as refused:
        load_settings(fleet_url="http://user:fleet-pw-secret@127.0.0.1:8080")
    assert "device's token" in str(refused.value) and "fleet-pw-secret" not in str(refused.value)
    result = CliRunner().invoke(app, ["fleet", "devices", "--server", "http://ops:cli-pw-secret@127.0.0.1:9"])
    assert result.exit_code == 2 and "cli-pw-secret" not in result.output


def test_urls_are_redacted_for_printing():
    assert redact_url("http://u:pw@host:8/x?y=1") == "http://u:***@host:8/x?y=1"
    assert redact_url("mqtts://host:8883") == "mqtts://host:8883"
    settings = load_settings(broker=f"mqtt://device:{quote(BROKER_PASSWORD)}@h:1883")
    assert settings.broker == "mqtt://h:1883" and settings.username == "device"
    assert settings.password is not None and settings.password.get_secret_value() == BROKER_PASSWORD
