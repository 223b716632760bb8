"""Messages with QoS, retain and user properties: a real function, a real mosquitto, the manifest's bounds."""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgefn.cli.main import app
from edgefn.config import Settings
from edgefn.daemon import Daemon
from tests.conftest import GUESTS, _built_copy, eventually, publish


@pytest.fixture(scope="module")
def alerts_fn(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tests/guests/alerts, built once for this module."""
    return _built_copy(GUESTS / "alerts", tmp_path_factory.mktemp("fn"))


@pytest.fixture()
def alerts_daemon(broker, settings_for, alerts_fn) -> Iterator[Daemon]:
    d = Daemon(settings_for(broker, alerts_fn))
    d.start()
    d.wait_connected(10)
    yield d
    d.stop(drain_timeout=2)


@pytest.mark.slow
def test_a_retained_last_alert_reaches_a_subscriber_that_comes_later(broker, alerts_daemon, collector):
    live = collector("alerts/#", "results/#")
    publish(broker.port, "sensors/dev1/alerts", [b"alert:overheat", b"fast", b"plain"])
    got = live.wait_for(3)
    assert got == [("alerts/dev1/last", b"overheat"), ("results/dev1/alerts", b"fast"),
                   ("results/dev1/alerts", b"plain")]
    assert live.delivery == [(1, False), (0, False), (1, False)]  # QoS 0 went out as asked
    assert live.properties[0]["severity"] == "high" and live.properties[0]["edgefn-event"]
    assert "severity" not in live.properties[2]  # the defaults: no properties of the function's
    deadline = time.monotonic() + 5  # the QoS 0 one too is done, though no PUBACK comes for it
    while alerts_daemon.outbox.awaiting_ack and time.monotonic() < deadline:
        time.sleep(0.02)
    assert alerts_daemon.outbox.awaiting_ack == 0

    later = collector("alerts/#")  # subscribes after the alert was published
    [(topic, body)] = later.wait_for(1)
    assert (topic, body, later.delivery[0]) == ("alerts/dev1/last", b"overheat", (1, True))
    assert later.properties[0]["severity"] == "high"


@pytest.mark.slow
def test_messages_past_the_manifests_bounds_are_refused_on_the_error_topic(broker, alerts_daemon, collector):
    errors = collector("edgefn/errors/alerts")
    results = collector("results/#")
    publish(broker.port, "sensors/dev1/alerts", [b"crowded", b"heavy", b"reserved", b"qos2", b"plain"])
    errs = [doc for _, doc in errors.wait_for(4)]
    assert [e["reason"] for e in errs] == ["output-rejected"] * 4
    texts = [e["error"] for e in errs]
    assert "3 user properties" in texts[0] and "limit of 2" in texts[0]
    assert "bytes of user properties" in texts[1] and "limit of 64" in texts[1]
    assert "'edgefn-event'" in texts[2]
    assert "qos 2" in texts[3]
    assert [m for m in results.wait_for(1)] == [("results/dev1/alerts", b"plain")]  # it still serves
    assert "forged" not in str(results.properties)


@pytest.mark.slow
def test_retain_is_refused_unless_the_manifest_allows_it(broker, settings_for, alerts_fn, collector, tmp_path):
    """The same component with `retain` left out of its manifest (the default: not allowed)."""
    folder = tmp_path / "alerts"
    folder.mkdir()
    for part in alerts_fn.iterdir():
        (folder / part.name).symlink_to(part)
    manifest = (alerts_fn / "edgefn.toml").read_text()
    (folder / "edgefn.toml").unlink()
    (folder / "edgefn.toml").write_text(manifest.replace("retain = true\n", ""))
    shutil.copystat(alerts_fn / "edgefn.toml", folder / "edgefn.toml")  # no newer than the built component
    errors, alerts = collector("edgefn/errors/alerts"), collector("alerts/#")
    d = Daemon(settings_for(broker, folder))
    d.start()
    try:
        d.wait_connected(10)
        publish(broker.port, "sensors/dev1/alerts", [b"alert:overheat"])
        [(_, err)] = errors.wait_for(1)
        assert err["reason"] == "output-rejected" and "does not allow retain" in err["error"]
        assert alerts.messages == []
    finally:
        d.stop(drain_timeout=2)


@pytest.mark.slow
def test_fn_invoke_shows_what_is_not_the_default(alerts_fn, component_cache):
    runner = CliRunner(env={"COLUMNS": "400"})
    common = ["fn", "invoke", str(alerts_fn), "--topic", "sensors/dev1/alerts", "--state-dir", str(component_cache)]
    alert = runner.invoke(app, [*common, "--payload", "alert:overheat"])
    assert alert.exit_code == 0, alert.output
    assert "alerts/dev1/last b'overheat'  [retained, severity=high]" in alert.output
    fast = runner.invoke(app, [*common, "--payload", "fast"])
    assert "results/dev1/alerts b'fast'  [qos 0]" in fast.output
    plain = runner.invoke(app, [*common, "--payload", "plain"])
    assert "results/dev1/alerts b'plain'\n" in plain.output


# --- a journal on a small disk -------------------------------------------------------------------------


def _state_on(disk: Path, settings: Settings) -> Settings:
    """The settings with their state dir on `disk` (the compiled components stay where they are)."""
    (disk / "components").symlink_to(settings.state_dir / "components", target_is_directory=True)
    return settings.model_copy(update={"state_dir": disk})


@pytest.mark.slow
@pytest.mark.parametrize("small_disk", ["48m"], indirect=True)
def test_the_journals_byte_budget_holds_a_flood_before_the_disk_is_full(broker, settings_for, hostile_fn, collector,
                                                                        small_disk: Path):
    """60 MB of large payloads on a 48 MiB disk, journaled faster than answered: the journal stops at
    its budget (by default half the free space), ingress holds the rest unacknowledged, and every
    event is answered; the disk never fills (an old journal filled it and stayed wedged)."""
    results = collector("results/#")
    d = Daemon(_state_on(small_disk, settings_for(broker, hostile_fn)))
    d.start()
    try:
        d.wait_connected(10)
        assert d.inbox.max_bytes < 24 * 1024 * 1024
        lowest, held, problems, done = [shutil.disk_usage(small_disk).free], [0], set(), threading.Event()

        def watch() -> None:  # from before the flood: the hold may be over before publish() returns
            while not done.wait(0.01):
                lowest[0] = min(lowest[0], shutil.disk_usage(small_disk).free)
                held[0] = max(held[0], d.ingress.held)
                if d.inbox.problem is not None:
                    problems.add(d.inbox.problem)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        try:
            publish(broker.port, "sensors/dev1/hostile", [b"ok" + b" " * 250_000 for _ in range(240)])
            assert eventually(lambda: len(results.messages) >= 240, 120), f"{len(results.messages)} of 240 answered"
        finally:
            done.set()
            watcher.join()
        assert len({body for _, body in results.messages}) == 240
        assert not problems, problems
        assert held[0] > 0  # the budget held ingress back
        assert lowest[0] > 8 * 1024 * 1024  # the disk never came near full
        assert d.health()["status"] == "ok"
    finally:
        d.stop(drain_timeout=2)


@pytest.mark.slow
@pytest.mark.xfail(strict=False, reason="known flake, 1 run of 3 after the merge: the journal did not reach its "
                   "1 MiB budget within 20 s (health stayed ok); not understood yet")
def test_health_says_the_journal_is_at_its_budget_while_ingress_holds_events(broker, settings_for, hostile_fn):
    """A journal at its byte budget holds new events back unacknowledged: /healthz says so, degraded
    (it said "journal": "ok", status ok, while the senders waited), and ok again once it has drained."""
    d = Daemon(settings_for(broker, hostile_fn, journal_max_bytes=1 << 20))
    d.start()
    try:
        d.wait_connected(10)
        # Each runs to its 300 ms deadline; each payload differs, or the same bytes would be quarantined and refused at once.
        publish(broker.port, "sensors/dev1/hostile", [b"loop" + b" " * (250_000 + i) for i in range(20)])

        def at_budget() -> bool:
            health = d.health()
            return "at its budget" in health["journal"] and health["status"] == "degraded" \
                and "journal_max_bytes" in health["problem"]

        assert eventually(at_budget, 20), d.health()
        assert eventually(lambda: d.ingress.held == 0 and d.ingress.outstanding == 0, 120), d.ingress.held
        assert eventually(lambda: d.health()["journal"] == "ok", 20), d.health()["journal"]
    finally:
        d.stop(drain_timeout=2)


@pytest.mark.slow
@pytest.mark.parametrize("small_disk", ["48m"], indirect=True)
def test_a_journal_that_filled_the_disk_drains_and_answers_every_event(broker, settings_for, hostile_fn, collector,
                                                                         small_disk: Path,
                                                                         caplog: pytest.LogCaptureFixture):
    """The same flood with no budget fills the disk; the pages of the events answered since go back
    to it, the daemon takes the rest as room returns, and answers them all (an old journal kept its
    free pages and stayed full: 4,092 of 4,457 events never answered; then a settle on the full disk
    needed as much room as the events it forgot, SQLite zeroing each freed page through the WAL:
    145-178 of 240 answered, 8 runs of 9)."""
    results = collector("results/#")
    # Half the disk taken by another program: the flood fills the rest however fast the answers come.
    (small_disk / "other").write_bytes(bytes(24 * 1024 * 1024))
    d = Daemon(_state_on(small_disk, settings_for(broker, hostile_fn, journal_max_bytes=1 << 40)))
    d.start()
    try:
        d.wait_connected(10)
        publish(broker.port, "sensors/dev1/hostile", [b"ok" + b" " * 250_000 for _ in range(240)])
        assert eventually(lambda: len(results.messages) >= 240, 120), \
            f"{len(results.messages)} of 240 answered: {d.inbox.problem}"
        # From the log: the full state may be over in a fraction of a second, before a poll would see it.
        assert any("disk full, refusing new events" in r.getMessage() for r in caplog.records), \
            "the flood never filled the disk"
        assert len({body for _, body in results.messages}) == 240
        assert eventually(lambda: d.health()["status"] == "ok", 20), d.health()["problem"]
    finally:
        d.stop(drain_timeout=2)
