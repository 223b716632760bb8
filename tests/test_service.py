"""edgefn as a systemd service: the notify protocol spoken to a real datagram socket (the test plays
systemd), and the unit, config and environment file the install command puts in place."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgefn.cli.main import app
from edgefn.service.install import CONFIG, ENVIRONMENT, UNIT, install
from edgefn.service.notify import Notifier
from tests.conftest import MODELS, ROOT


class FakeSystemd:
    """The notify socket systemd would hand a Type=notify service, and what arrives on it."""

    def __init__(self, address: str):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.address = address

    def receive(self, timeout: float) -> list[str] | None:
        """The next message's KEY=VALUE lines, or None when none came within `timeout`."""
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(4096).decode().split("\n")
        except TimeoutError:
            return None

    def until(self, field: str, timeout: float) -> list[list[str]]:
        """Every message up to and with the first holding `field`; fails when it does not come in time."""
        seen, deadline = [], time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            message = self.receive(left)
            if message is None:
                break
            seen.append(message)
            if field in message:
                return seen
        pytest.fail(f"no {field} within {timeout} s (got {seen})")


@pytest.fixture()
def systemd(tmp_path: Path) -> Iterator[FakeSystemd]:
    fake = FakeSystemd(str(tmp_path / "notify"))
    yield fake
    fake.sock.close()


def test_the_daemon_says_ready_pings_the_watchdog_and_says_stopping(systemd: FakeSystemd, broker, digits_fn: Path,
                                                                    component_cache: Path, tmp_path: Path):
    state = tmp_path / "state"
    state.mkdir()
    (state / "components").symlink_to(component_cache, target_is_directory=True)
    env = {**os.environ, "NOTIFY_SOCKET": systemd.address, "WATCHDOG_USEC": "200000",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("WATCHDOG_PID", None)
    daemon = subprocess.Popen([sys.executable, "-m", "edgefn", "run", "--broker", broker.url, "--functions",
                               str(digits_fn), "--models", str(MODELS), "--state-dir", str(state), "--no-build",
                               "--client-id", f"edgefn-notify-{os.getpid()}"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        try:
            before = systemd.until("READY=1", timeout=300)  # a cold cache compiles first
        except BaseException:
            daemon.kill()
            print(daemon.communicate()[1][-3000:])
            raise
        assert before[-1] == ["READY=1", "STATUS=serving 1 functions"]
        assert all("WATCHDOG=1" not in m for m in before)  # nothing before it is ready
        started, pings = time.monotonic(), 0
        while time.monotonic() - started < 1.0:
            if systemd.receive(0.5) == ["WATCHDOG=1"]:
                pings += 1
        assert 5 <= pings <= 15, f"{pings} pings in 1 s at WATCHDOG_USEC=0.2 s (expected one per 0.1 s)"
        daemon.send_signal(signal.SIGTERM)
        assert systemd.until("STOPPING=1", timeout=10)[-1][0] == "STOPPING=1"
        assert daemon.wait(timeout=30) == 0
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
        daemon.stderr.close()


def test_an_abstract_socket_and_the_watchdog_of_another_process(tmp_path: Path):
    name = f"@edgefn-test-{os.getpid()}-{time.monotonic_ns()}"
    systemd = FakeSystemd("\0" + name[1:])
    try:
        notifier = Notifier({"NOTIFY_SOCKET": name, "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": str(os.getpid())})
        assert notifier.watchdog_s == 0.5
        assert not notifier.watchdog()  # not before it is ready
        assert notifier.ready("up") and systemd.receive(1) == ["READY=1", "STATUS=up"]
        assert notifier.watchdog() and systemd.receive(1) == ["WATCHDOG=1"]
        assert not notifier.watchdog()  # within half the interval: not again
        other = Notifier({"NOTIFY_SOCKET": name, "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"})
        assert other.watchdog_s is None and not other.watchdog()  # meant for another process
    finally:
        systemd.sock.close()


def test_no_ping_overtakes_ready_while_it_is_being_sent(systemd: FakeSystemd):
    class SlowReady(Notifier):
        def send(self, *fields: str) -> bool:
            if fields[0] == "READY=1":
                time.sleep(0.2)  # a slow datagram: housekeeping's pings run on meanwhile
            return super().send(*fields)

    notifier = SlowReady({"NOTIFY_SOCKET": systemd.address, "WATCHDOG_USEC": "100000"})  # a ping per 50 ms
    stop = threading.Event()

    def housekeeping() -> None:
        while not stop.is_set():
            notifier.watchdog()
            time.sleep(0.001)

    pinger = threading.Thread(target=housekeeping)
    pinger.start()
    try:
        notifier.ready("up")
        assert systemd.receive(1) == ["READY=1", "STATUS=up"]
        assert systemd.receive(1) == ["WATCHDOG=1"]
    finally:
        stop.set()
        pinger.join()


def test_outside_systemd_nothing_is_sent_and_a_gone_socket_is_no_error(tmp_path: Path):
    assert not Notifier({}).enabled and not Notifier({}).ready()
    gone = Notifier({"NOTIFY_SOCKET": str(tmp_path / "nobody-listens")})
    assert not gone.ready() and not gone.stopping()


def test_install_puts_the_unit_config_and_environment_in_place(tmp_path: Path):
    root = tmp_path / "root"
    result = CliRunner().invoke(app, ["service", "install", "--root", str(root), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert f"would write {root / UNIT} (mode 644)" in result.output and not root.exists()

    result = CliRunner().invoke(app, ["service", "install", "--root", str(root)])
    assert result.exit_code == 0, result.output
    assert "systemctl" not in "".join(str(s) for s in install(root, dry_run=True))  # not for another root
    unit = (root / UNIT).read_text()
    for line in ("Type=notify", "WatchdogSec=30", "StateDirectory=edgefn", "NotifyAccess=main",
                 "EnvironmentFile=-/etc/edgefn/edgefn.env"):
        assert f"\n{line}\n" in unit
    exec_start = next(line for line in unit.splitlines() if line.startswith("ExecStart="))
    program = exec_start.removeprefix("ExecStart=").split()[0]
    assert os.access(program, os.X_OK) and exec_start.endswith("run --config /etc/edgefn/config.toml --no-build")
    assert stat.S_IMODE((root / ENVIRONMENT).stat().st_mode) == 0o600
    assert 'state_dir = "/var/lib/edgefn"' in (root / CONFIG).read_text()

    (root / CONFIG).write_text('broker = "mqtt://broker.local:1883"\n')  # the operator's edit
    assert [s.action for s in install(root)] == ["write", "keep", "keep"]
    assert (root / CONFIG).read_text() == 'broker = "mqtt://broker.local:1883"\n'


def test_an_install_without_the_service_files_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A wheel built without edgefn/service/files (its package data): one line saying what is missing and
    what to do, no traceback (tests/arm64/install.py met the traceback when the package data was dropped)."""
    import edgefn.service.install as service

    monkeypatch.setattr(service, "FILES", tmp_path / "files")  # what such a wheel installs: no folder
    result = CliRunner().invoke(app, ["service", "install", "--root", str(tmp_path / "root")])
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), (result.output, result.exception)
    assert "lacks its service file edgefn.service" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "root").exists()


def test_the_example_config_loads_as_the_daemons_settings():
    from edgefn.config import load_settings
    from edgefn.service.install import FILES

    settings = load_settings(FILES / "config.toml")
    assert settings.state_dir == Path("/var/lib/edgefn") and settings.metrics_port == 9464


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_accepts_the_unit(tmp_path: Path):
    root = tmp_path / "root"
    install(root)
    done = subprocess.run(["systemd-analyze", "verify", str(root / UNIT)], capture_output=True, text=True)
    assert done.returncode == 0 and done.stderr.strip() == "", done.stderr
