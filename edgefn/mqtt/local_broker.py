"""A private mosquitto on a free loopback port, for the demo, the tests and the benchmarks."""

from __future__ import annotations

import getpass
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from edgefn.childproc import stop_gracefully
from edgefn.errors import BrokerError

_SEARCH = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto", "/opt/homebrew/sbin/mosquitto")


def mosquitto_binary() -> str:
    found = shutil.which("mosquitto") or next((p for p in _SEARCH if Path(p).exists()), None)
    if found is None:
        raise BrokerError("mosquitto is not installed (Debian/Ubuntu: apt-get install mosquitto)")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalBroker:
    """`with LocalBroker() as broker: broker.url` -> mqtt://127.0.0.1:<port>; stopped on exit.

    `extra_config` lines are appended to mosquitto.conf (listeners for TLS tests, limits, ...).
    mosquitto's defaults are kept otherwise, so what runs here is what a stock broker does: Nagle's
    algorithm on (`set_tcp_nodelay false`), 1000 queued messages per client. `tuned=True` turns
    Nagle off, as a broker tuned for latency would (a second row in the benchmarks).
    """

    def __init__(self, port: int | None = None, extra_config: str = "", persistent: bool = False,
                 tuned: bool = False):
        self.port = port or free_port()
        self._extra = extra_config + ("\nset_tcp_nodelay true" if tuned else "")
        self._persistent = persistent  # sessions and queued messages survive a restart()
        self._dir = tempfile.TemporaryDirectory(prefix="edgefn-mosquitto-")
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> LocalBroker:
        conf = Path(self._dir.name) / "mosquitto.conf"
        # per_listener_settings: extra listeners (TLS, passwords) carry their own rules.
        # `user`: run as whoever started it (as root, mosquitto would switch to its own user and
        # lose access to the files named in extra_config).
        persistence = (f"persistence true\npersistence_location {self._dir.name}/\n" if self._persistent
                       else "persistence false\n")
        conf.write_text(f"user {getpass.getuser()}\nper_listener_settings true\n{persistence}"
                        f"log_dest stderr\nlog_type error\nlistener {self.port} 127.0.0.1\nallow_anonymous true\n"
                        f"{self._extra}\n")
        if hasattr(self, "_log"):
            self._log.close()  # a restart
        self._log = open(Path(self._dir.name) / "mosquitto.log", "ab")
        # Its own session: a Ctrl-C meant for the demo must not take the broker down first.
        self._proc = subprocess.Popen([mosquitto_binary(), "-c", str(conf)], stdout=self._log, stderr=self._log,
                                      start_new_session=True)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise BrokerError(f"mosquitto exited: {self.log_text()[-500:]}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return self
            except OSError:
                time.sleep(0.05)
        raise BrokerError(f"mosquitto did not listen on port {self.port} within 10 s")

    def restart(self, down_for: float = 0.0) -> None:
        """Stop the broker (cleanly: a persistent one saves its state) and start it again."""
        self.stop()
        time.sleep(down_for)
        self.start()

    @property
    def pid(self) -> int:
        """The broker's process id (tests stop and continue it to play a broker that hangs)."""
        assert self._proc is not None, "the broker is not running"
        return self._proc.pid

    def log_text(self) -> str:
        return (Path(self._dir.name) / "mosquitto.log").read_text(errors="replace")

    def stop(self) -> None:
        if self._proc is not None:
            stop_gracefully(self._proc, 5)
        self._proc = None

    def close(self) -> None:
        self.stop()
        if hasattr(self, "_log"):
            self._log.close()
        self._dir.cleanup()

    def __enter__(self) -> LocalBroker:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc: object) -> None:
        self.close()
