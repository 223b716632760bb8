"""Shared fixtures: a real mosquitto per test, real components built once per session."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edgefn.config import Settings, load_settings
from edgefn.functions.build import build
from edgefn.functions.sandbox import Runtime
from edgefn.mqtt.local_broker import LocalBroker

ROOT = Path(__file__).resolve().parent.parent
DIGITS_FN = ROOT / "examples" / "functions" / "digits"
MODELS = ROOT / "models"
GUESTS = Path(__file__).parent / "guests"


@pytest.fixture(scope="session")
def component_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One compiled-component cache for the session: each component is compiled once."""
    return tmp_path_factory.mktemp("components")


@pytest.fixture(scope="session")
def runtime(component_cache: Path) -> Iterator[Runtime]:
    with Runtime(component_cache) as rt:
        yield rt


def _built_copy(src: Path, dest_root: Path) -> Path:
    dest = dest_root / src.name
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns("build", "__pycache__"))
    build(dest)
    return dest


@pytest.fixture(scope="session")
def digits_fn(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The digits example, built from its source into a private folder."""
    return _built_copy(DIGITS_FN, tmp_path_factory.mktemp("fn"))


@pytest.fixture(scope="session")
def hostile_fn(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A guest that misbehaves on request (see tests/guests/hostile/app.py)."""
    return _built_copy(GUESTS / "hostile", tmp_path_factory.mktemp("fn"))


TINY_TOML = """[function]
name = "tiny"
version = "1.0.0"

[trigger]
topics = ["sensors/+/tiny"]
"""


@pytest.fixture(scope="module")
def tiny_fn(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A function folder with a stand-in component: bundles, TUF and releases need bytes, not a working guest."""
    folder = tmp_path_factory.mktemp("fn") / "tiny"
    folder.mkdir()
    (folder / "edgefn.toml").write_text(TINY_TOML)
    (folder / "app.py").write_text("")
    (folder / "build").mkdir()
    (folder / "build" / "tiny.wasm").write_bytes(b"\0asm\x0d\0\x01\0" + b"tiny" * 64)
    return folder


@pytest.fixture()
def broker() -> Iterator[LocalBroker]:
    with LocalBroker() as b:
        yield b


@pytest.fixture()
def ops(tmp_path: Path) -> Path:
    """The operator's repository: keys and signed metadata."""
    from edgefn.fleet.signing import init_keys

    init_keys(tmp_path / "ops")
    return tmp_path / "ops"


@pytest.fixture()
def started():
    """`started(settings)`: a Daemon started and connected; every one stopped at the end of the test."""
    from edgefn.daemon import Daemon

    daemons: list[Daemon] = []

    def start(settings: Settings) -> Daemon:
        d = Daemon(settings)
        d.start()
        d.wait_connected(10)
        daemons.append(d)
        return d

    yield start
    for d in daemons:
        d.stop(drain_timeout=2)


@pytest.fixture()
def settings_for(tmp_path: Path, component_cache: Path):
    """settings_for(broker, functions...) -> Settings with a private state dir and shared cache."""

    def make(local: LocalBroker, *functions: Path, **extra: object) -> Settings:
        state = tmp_path / "state"
        (state).mkdir(exist_ok=True)
        components = state / "components"
        if not components.exists():
            components.symlink_to(component_cache, target_is_directory=True)
        values = {"broker": local.url, "functions": list(functions), "models": [MODELS], "state_dir": state,
                  "client_id": f"edgefn-test-{time.monotonic_ns()}", **extra}
        return load_settings(**values)

    return make


class Collector:
    """Subscribes to topics and keeps every message as (topic, decoded JSON or raw bytes)."""

    def __init__(self, port: int, *filters: str):
        self.messages: list[tuple[str, object]] = []
        self.properties: list[dict[str, str]] = []  # each message's MQTT 5 user properties, in the same order
        self.delivery: list[tuple[int, bool]] = []  # each message's (qos, retain) as delivered to us
        self._cond = threading.Condition()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"collector-{time.monotonic_ns()}",
                                  protocol=mqtt.MQTTv5)
        self.client.on_message = self._on
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *a: subscribed.set()
        # A consumer of results as the README says one should be: MQTT 5 with a large Receive Maximum,
        # so that a stock broker (20 in flight, 1000 queued) never drops results on their way to it.
        props = Properties(PacketTypes.CONNECT)
        props.ReceiveMaximum = 65535
        self.client.connect("127.0.0.1", port, properties=props)
        self.client.subscribe([(f, 1) for f in filters])
        self.client.loop_start()
        assert subscribed.wait(5), "collector could not subscribe"

    def _on(self, _c: object, _u: object, msg: mqtt.MQTTMessage) -> None:
        try:
            body: object = json.loads(msg.payload)
        except ValueError:
            body = msg.payload
        with self._cond:
            self.messages.append((msg.topic, body))
            self.properties.append(dict(getattr(msg.properties, "UserProperty", None) or []))
            self.delivery.append((msg.qos, bool(msg.retain)))
            self._cond.notify_all()

    def wait_for(self, count: int, timeout: float = 10.0) -> list[tuple[str, object]]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self.messages) < count and time.monotonic() < deadline:
                self._cond.wait(deadline - time.monotonic())
            return list(self.messages)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@pytest.fixture()
def collector(broker: LocalBroker) -> Iterator[callable]:
    made: list[Collector] = []

    def make(*filters: str) -> Collector:
        c = Collector(broker.port, *filters)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


def eventually(condition, timeout: float) -> bool:
    """Poll `condition` until it holds or `timeout` seconds pass; whether it holds then."""
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.02)
    return condition()


def publish(port: int, topic: str, payloads: list[bytes]) -> None:
    """Publish at QoS1 and wait until the broker has acknowledged every message."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"sensor-{time.monotonic_ns()}")
    client.connect("127.0.0.1", port)
    client.loop_start()
    infos = [client.publish(topic, p, qos=1) for p in payloads]
    for info in infos:
        info.wait_for_publish(10)
    client.loop_stop()
    client.disconnect()


@pytest.fixture()
def small_disk(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Path]:
    """A real 4 MiB filesystem (tmpfs), so that writes meet ENOSPC as on a full device. Needs root.
    Another size by indirect parametrization: `@pytest.mark.parametrize("small_disk", ["48m"], indirect=True)`."""
    size = getattr(request, "param", "4m")
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0:
        # A skipped test proves nothing: like the peers' venv and faketime, what the suite needs it asks for.
        pytest.fail(f"the full-disk tests mount a {size} tmpfs and need root: run the suite as root (CI does)")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(disk)], capture_output=True,
                             text=True)
    assert mounted.returncode == 0, f"cannot mount a {size} tmpfs for the full-disk tests: {mounted.stderr.strip()}"
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=True)


def fill(disk: Path) -> Path:
    """Take every free byte of `disk` with a file, as another program filling the device would."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        for block in (1 << 16, 4096, 512):
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, bytes(block))
    finally:
        os.close(fd)
    return filler


def digits_copies(digits_fn: Path, dest: Path, n: int) -> tuple[Path, Path]:
    """`n` copies of the built digits function (d0 ... d<n-1>) under dest/functions, and a folder of models for
    them under dest/models: each copy differs only in its name and topics, and calls the model named like it
    (the digits example's way), here the digits model under another name (its files linked, not copied)."""
    functions, models = dest / "functions", dest / "models"
    for i in range(n):
        name = f"d{i}"
        folder = functions / name
        shutil.copytree(digits_fn, folder, ignore=shutil.ignore_patterns("__pycache__"))
        text = (folder / "edgefn.toml").read_text()
        (folder / "edgefn.toml").write_text(text.replace('name = "digits"', f'name = "{name}"')
                                            .replace("/digits", f"/{name}").replace('["digits"]', f'["{name}"]'))
        (folder / "build" / "digits.wasm").rename(folder / "build" / f"{name}.wasm")
        model = models / name
        model.mkdir(parents=True)
        for part in (MODELS / "digits").iterdir():
            if part.name == "model.json":
                (model / part.name).write_text(part.read_text().replace('"name": "digits"', f'"name": "{name}"', 1))
            else:
                (model / part.name).symlink_to(part)
    return functions, models
