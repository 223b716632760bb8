"""The broker connection: its packing of MQTT 5 user properties (byte for byte what paho's Properties packs),
QoS 0 events, lost SUBACKs and PUBACKs against a real mosquitto (stock, and with a large queue)."""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from hypothesis import given
from hypothesis import strategies as st
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edgefn.config import load_settings
from edgefn.journal.inbox import Inbox
from edgefn.mqtt.connection import Connection
from edgefn.mqtt.egress import UserProperties
from edgefn.mqtt.ingress import Ingress
from edgefn.mqtt.local_broker import LocalBroker
from edgefn.protocol.outputs import POSSIBLE_DUPLICATE
from tests.conftest import Collector, eventually, publish
from tests.mqtt_proxy import PUBACK, SUBACK, SUBSCRIBE, DroppingProxy

TEXT = st.text(st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00"), max_size=300)


@given(st.lists(st.tuples(TEXT, TEXT), max_size=6))
def test_user_properties_pack_as_paho_does(pairs: list[tuple[str, str]]):
    reference = Properties(PacketTypes.PUBLISH)
    reference.UserProperty = list(pairs)
    assert UserProperties(pairs).pack() == reference.pack()


def test_marking_a_message_as_a_possible_duplicate_repacks_it_once():
    props = UserProperties([("edgefn-event", "7")])
    before = props.pack()
    props.add(POSSIBLE_DUPLICATE)
    props.add(POSSIBLE_DUPLICATE)
    reference = Properties(PacketTypes.PUBLISH)
    reference.UserProperty = [("edgefn-event", "7"), POSSIBLE_DUPLICATE]
    assert props.pack() == reference.pack() != before


# -- against a real mosquitto, in its stock configuration and with a large queue ---------------------

MAX_QUEUED = {"stock": 1000, "queue100000": 100_000}  # mosquitto's max_queued_messages


@pytest.fixture(params=list(MAX_QUEUED))
def any_broker(request: pytest.FixtureRequest) -> Iterator[LocalBroker]:
    config = "" if request.param == "stock" else f"max_queued_messages {MAX_QUEUED[request.param]}\n"
    with LocalBroker(extra_config=config) as b:
        b.max_queued = MAX_QUEUED[request.param]  # type: ignore[attr-defined]
        yield b


def _connection(tmp_path: Path, port: int, on_message, filters=(), client_id: str | None = None, **kw) -> Connection:
    settings = load_settings(broker=f"mqtt://127.0.0.1:{port}", client_id=client_id or f"edgefn-{time.monotonic_ns()}",
                             state_dir=tmp_path / "state")
    conn = Connection(settings, on_message, list(filters), **kw)
    conn.start()
    conn.wait_connected(10)
    return conn


def _connected_client(broker: LocalBroker, tmp_path: Path) -> mqtt.Client:
    """The daemon's kind of client, its CONNECT sent, paho's loop not started."""
    from edgefn.mqtt.client import broker_client

    client = broker_client(load_settings(broker=broker.url, state_dir=tmp_path), f"inline-{time.monotonic_ns()}")
    client.connect("127.0.0.1", broker.port)
    return client


def _sensor(port: int) -> mqtt.Client:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"sensor-{time.monotonic_ns()}", protocol=mqtt.MQTTv5)
    client.connect("127.0.0.1", port)
    client.loop_start()
    return client


class Acks:
    """on_acked callbacks, by output: each must come exactly once."""

    def __init__(self):
        self.calls: Counter[int] = Counter()
        self.refused: list[str] = []

    def callback(self, n: int):
        def acked(refused: str | None) -> None:
            self.calls[n] += 1
            if refused is not None:
                self.refused.append(refused)
        return acked


@pytest.mark.broker
@pytest.mark.parametrize("qos", [[0], [0, 1]], ids=["qos0", "mixed"])
def test_qos0_events_are_journaled_and_answered_without_dropping_the_connection(tmp_path, any_broker, qos):
    # mosquitto_pub's default, and many sensors', is QoS 0: acknowledging one breaks the connection.
    inbox, drops, acks = Inbox(tmp_path / "inbox.sqlite"), [], Acks()
    conn: Connection | None = None

    def answer(events):
        for e in events:
            conn.publish(f"results/{e.topic}", e.payload, acks.callback(int(e.payload)))

    ingress = Ingress(inbox, 10_000, answer, lambda mid, q, p: conn.ack(mid, q, p), lambda: conn.has_more_to_read())
    conn = _connection(tmp_path, any_broker.port, ingress.on_message, ["sensors/#"],
                       on_disconnect=lambda priority: drops.append(1))
    assert eventually(lambda: conn.awaiting_suback == 0, 5)
    stop = threading.Event()
    flusher = threading.Thread(target=lambda: [ingress.flush() for _ in iter(lambda: stop.wait(0.005), True)])
    flusher.start()  # the daemon's timer: a group left open by a packet that was not an event
    results = Collector(any_broker.port, "results/#")
    sensor = _sensor(any_broker.port)
    try:
        infos = [sensor.publish("sensors/t", str(n).encode(), qos=qos[n % len(qos)]) for n in range(200)]
        [info.wait_for_publish(5) for info in infos]
        assert eventually(lambda: len(acks.calls) == 200, 10), f"{len(acks.calls)} of 200 answered"
        assert len(results.wait_for(200)) == 200 and len(inbox) == 200
        assert drops == [] and set(acks.calls.values()) == {1} and acks.refused == []
    finally:
        stop.set()
        flusher.join()
        sensor.loop_stop()
        results.close()
        conn.stop()
        inbox.close()


@pytest.mark.broker
def test_a_reconnect_with_a_backlog_publishes_without_its_suback_and_subscribes_again(tmp_path, any_broker):
    # mosquitto 2.0.16-2.0.20 drop the SUBACK behind a large resend; the proxy drops it on any version.
    client_id = f"edgefn-backlog-{time.monotonic_ns()}"
    away = _connection(tmp_path, any_broker.port, lambda *event: None, ["sensors/#"], client_id=client_id)
    assert eventually(lambda: away.awaiting_suback == 0, 5)
    sensor = _sensor(any_broker.port)
    infos = [sensor.publish("sensors/t", f"in-flight {n}".encode(), qos=1) for n in range(2000)]
    [info.wait_for_publish(10) for info in infos]  # sent to `away`, which never acknowledges (a full inbox)
    away.stop()
    infos = [sensor.publish("sensors/t", f"while away {n}".encode(), qos=1) for n in range(1500)]
    [info.wait_for_publish(10) for info in infos]
    proxy = DroppingProxy(any_broker.port, lambda kind, n, connection: (kind, n, connection) == (SUBACK, 1, 1))
    received: list[tuple[bytes, int, int]] = []  # acknowledged once the connection is up

    def on_message(topic, payload, mid, qos, dup, priority, hop):
        received.append((payload, mid, qos))

    back = _connection(tmp_path, proxy.port, on_message, ["sensors/#"], client_id=client_id, suback_timeout=0.5)
    acks = Acks()
    try:
        for n in range(10):
            back.publish("results/t", b"r", acks.callback(n))
        acked = 0
        while eventually(lambda acked=acked: len(received) > acked, 2):  # the events, as the inbox takes them
            for _, mid, qos in received[acked:]:
                back.ack(mid, qos)
                acked += 1
        assert eventually(lambda: len(acks.calls) == 10, 5), "outputs held back"
        assert eventually(lambda: back.awaiting_suback == 0, 5) and proxy.dropped[SUBACK] == 1
        # Every event the broker had in flight comes again, once; of those published while the client was
        # away, a broker with room keeps all, and a stock one (max_queued_messages 1000, counting what it had
        # in flight to the client) drops nearly all: what it kept is its business, that we got it is ours.
        got = [payload for payload, _, _ in received]
        assert len(got) == len(set(got)), "an event received twice"
        in_flight = {f"in-flight {n}".encode() for n in range(2000)}
        while_away = {f"while away {n}".encode() for n in range(1500)}
        assert in_flight <= set(got) and set(got) - in_flight <= while_away
        if any_broker.max_queued >= 3500:
            assert set(got) == in_flight | while_away
    finally:
        sensor.loop_stop()
        back.stop()
        proxy.close()


FIRST_SUBSCRIBE = {  # either way no SUBACK comes: the proxy drops the client's SUBSCRIBE, or the broker's SUBACK
    "subscribe_lost": {"drop_sent": lambda kind, n, connection: (kind, n, connection) == (SUBSCRIBE, 1, 1)},
    "suback_lost": {"drop": lambda kind, n, connection: (kind, n, connection) == (SUBACK, 1, 1)},
}


@pytest.mark.broker
@pytest.mark.parametrize("lost", list(FIRST_SUBSCRIBE))
def test_a_lost_suback_is_asked_again_within_seconds_and_events_flow(tmp_path, broker, lost):
    # A new session (the broker holds no subscription for it): with its SUBSCRIBE lost nothing reaches it
    # until it subscribes again, which it used to do only 30 s later. Its retained message comes once,
    # though the broker may have taken the first SUBSCRIBE too.
    proxy = DroppingProxy(broker.port, **FIRST_SUBSCRIBE[lost])
    received: list[bytes] = []
    settings = load_settings(broker=f"mqtt://127.0.0.1:{proxy.port}", client_id=f"edgefn-lost-{time.monotonic_ns()}",
                             state_dir=tmp_path / "state")
    conn = Connection(settings, lambda topic, payload, *_: received.append(payload), ["sensors/#"])
    sensor = _sensor(broker.port)
    sensor.publish("sensors/state", b"retained", qos=1, retain=True).wait_for_publish(5)
    started = time.monotonic()
    conn.start()
    try:
        n = 0
        while not any(p.startswith(b"probe") for p in received) and time.monotonic() - started < 15:
            sensor.publish("sensors/t", f"probe {n}".encode(), qos=1).wait_for_publish(5)
            n += 1
            time.sleep(0.25)
        assert len(received) > 1, f"no event within {time.monotonic() - started:.1f} s of connecting"
        assert eventually(lambda: conn.awaiting_suback == 0, 10 - (time.monotonic() - started)), "no SUBACK in 10 s"
        assert proxy.dropped[SUBACK] + proxy.dropped_sent[SUBSCRIBE] == 1
        assert time.monotonic() - started < 10
        time.sleep(0.5)
        assert received.count(b"retained") == 1
    finally:
        sensor.loop_stop()
        conn.stop()
        proxy.close()


LOSSES = {
    "one_puback_lost": lambda kind, n, connection: kind == PUBACK and connection == 1 and n == 300,
    "pubacks_stop": lambda kind, n, connection: kind == PUBACK and connection == 1 and n >= 300,
}


@pytest.mark.broker
@pytest.mark.parametrize("loss", list(LOSSES))
def test_lost_pubacks_are_recovered_each_callback_once_in_order(tmp_path, any_broker, loss):
    proxy = DroppingProxy(any_broker.port, LOSSES[loss])
    results = Collector(any_broker.port, "results/#")
    conn = _connection(tmp_path, proxy.port, lambda *event: None, ack_timeout=1.0)
    acks = Acks()
    try:
        for n in range(2000):
            conn.publish("results/t", str(n).encode(), acks.callback(n), [("edgefn-event", str(n))])
        assert eventually(lambda: len(acks.calls) == 2000, 20), f"{2000 - len(acks.calls)} outputs stuck"
        assert set(acks.calls.values()) == {1} and acks.refused == [] and proxy.dropped[PUBACK] >= 1
        assert conn.awaiting_ack == 0
        assert eventually(lambda: len({body for _, body in results.messages}) == 2000, 5)
        first = list(dict.fromkeys(int(body) for _, body in results.wait_for(0)))
        assert first == list(range(2000))  # every output, and in order where first seen
        seen: set[object] = set()
        for (_, body), props in zip(results.messages, results.properties, strict=True):
            assert body not in seen or props.get(POSSIBLE_DUPLICATE[0]) == POSSIBLE_DUPLICATE[1]  # a repeat says so
            seen.add(body)
    finally:
        conn.stop()
        results.close()
        proxy.close()


@pytest.mark.broker
@pytest.mark.parametrize("slow_pingreq", [False, True])
def test_paused_reading_holds_events_at_the_broker_and_keeps_the_connection_past_its_keepalive(tmp_path,
                                                                                               slow_pingreq):
    """Ingress pauses reading past its bound in bytes; the connection must survive a pause longer than
    its keepalive (paho cannot read the PINGRESP meanwhile) and then get every event. slow_pingreq: paho
    stamps a PINGREQ 20 ms after its keepalive check's `now` (a loaded machine); its next check then
    skipped one and loop_misc dropped the session at once (the CI's failure, made certain)."""
    got: list[bytes] = []
    disconnects: list[int] = []
    with LocalBroker() as broker:
        conn = _connection(tmp_path, broker.port, lambda t, p, mid, qos, dup, priority, hop: got.append(p), ["sensors/#"],
                           keepalive=1)
        conn._on_disconnect = lambda priority: disconnects.append(1)
        if slow_pingreq:
            client = conn._sessions["normal"].link.client
            send = client._send_simple_command

            def slowly(command: int) -> mqtt.MQTTErrorCode:
                rc = send(command)
                if command == mqtt.PINGREQ:
                    time.sleep(0.02)
                return rc

            client._send_simple_command = slowly
        try:
            conn.pause_reading(True)
            sensor = _sensor(broker.port)
            for i in range(20):
                sensor.publish("sensors/a/x", b"%d" % i, qos=1).wait_for_publish(5)
            time.sleep(3.5)  # three keepalives
            assert got == [], "nothing read while paused"
            conn.pause_reading(False)
            assert eventually(lambda: len(got) == 20, 10), len(got)
            assert got == [b"%d" % i for i in range(20)] and disconnects == []
            sensor.loop_stop()
            sensor.disconnect()
        finally:
            conn.stop()


def test_a_network_thread_stalled_while_paused_keeps_its_session(broker: LocalBroker, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch):
    """Paused, with the broker's PINGRESP waiting unread in the socket: the broker is alive. A network thread
    stalled in the paused wait for longer than the keepalive (a loaded board; the suite once dropped a
    session so) must not come back to a keepalive check that sees a stale time and drops the session."""
    import edgefn.mqtt.client as client_module

    client = _connected_client(broker, tmp_path)
    connected = threading.Event()
    client.on_connect = lambda *_: connected.set()
    while not connected.is_set():
        assert client.loop(0.5) == mqtt.MQTTErrorCode.MQTT_ERR_SUCCESS
    client._keepalive = 1  # paho's side only: the broker keeps the 60 s of the CONNECT
    client.paused = True
    client._send_pingreq()  # its PINGRESP stays unread: the socket is readable
    time.sleep(0.1)
    monkeypatch.setattr(client_module, "_PAUSED_WAIT_S", 1.2)  # the stall, past the keepalive
    try:
        assert client.loop(0.5) == mqtt.MQTTErrorCode.MQTT_ERR_SUCCESS
        assert client.is_connected() and client.socket() is not None
    finally:
        client.disconnect()


@pytest.mark.broker
def test_a_broker_that_reads_our_acknowledgements_late_keeps_the_events_session(tmp_path):
    """mosquitto reads one packet per socket per pass of its loop: under load our PUBACKs for the
    sensors' events wait in its socket, our PINGREQ behind them, and once the sensors stop nothing
    comes back for a while. paho dropped the session for its keepalive, and the broker resent every
    event in flight (seen at ~2.5 min of a 2x overload, results stopped for a minute)."""
    got: list[tuple[int, bool]] = []
    disconnects: list[int] = []
    holder: list[Connection] = []

    def journaled(topic, payload, mid, qos, dup, priority, hop):
        got.append((mid, dup))
        holder[0].ack(mid, qos, priority)

    client_id = f"edgefn-late-{time.monotonic_ns()}"
    with LocalBroker() as broker:
        proxy = DroppingProxy(broker.port)
        proxy.read_slowly[client_id] = 0.01  # the broker reads 100 of our packets a second
        conn = _connection(tmp_path, proxy.port, journaled, ["sensors/#"], client_id=client_id, keepalive=1)
        holder.append(conn)
        conn._on_disconnect = lambda priority: disconnects.append(1)
        sensor = _sensor(broker.port)
        acks = Acks()
        try:
            infos = [sensor.publish("sensors/a/x", b"e", qos=1) for _ in range(400)]
            [info.wait_for_publish(10) for info in infos]
            assert eventually(lambda: len(got) == 400, 10), len(got)
            deadline = time.monotonic() + 5  # the broker reads the last of 400 PUBACKs ~4 s from now
            n = 0
            while time.monotonic() < deadline:  # results flow meanwhile: the broker is alive
                conn.publish("results/t", b"%d" % n, acks.callback(n))
                n += 1
                time.sleep(0.1)
            assert disconnects == [] and proxy._connections[client_id] == 1, "the events session was dropped"
            assert not any(dup for _, dup in got) and len(got) == 400, "events were sent again"
            events = conn._sessions["normal"]
            assert eventually(lambda: events.link.client._ping_t == 0, 5), "the PINGRESP never came"
            conn._results.client.heard_at = 0.0  # the other session silent too: the broker may be gone
            assert not conn._silence_excused(events)
        finally:
            sensor.loop_stop()
            conn.stop()
            proxy.close()


@pytest.mark.broker
def test_a_pause_never_keeps_the_pubacks_of_our_results_unread(tmp_path):
    """PUBACKs come in the same stream as the events: a pause that kept them unread stalled publishing,
    then answering, then the room the pause waited for (50 s without a result in a 10-minute overload)."""
    with LocalBroker() as broker:
        conn = _connection(tmp_path, broker.port, lambda *event: None, ["sensors/#"])
        acks = Acks()
        try:
            conn.pause_reading(True)
            for n in range(50):
                conn.publish("results/t", b"%d" % n, acks.callback(n))
            assert eventually(lambda: len(acks.calls) == 50, 5), f"{50 - len(acks.calls)} results still await a PUBACK"
            assert set(acks.calls.values()) == {1}
        finally:
            conn.stop()


@pytest.mark.broker
def test_results_are_acknowledged_at_once_while_events_crowd_the_stream_to_us(tmp_path):
    """Under overload the broker's stream to the daemon holds thousands of events, read only as fast as
    the inbox takes them. PUBACKs for results once queued behind them (20 in flight on a stock broker):
    219 of 110,219 events answered in a 5-minute overload. Results have a session of their own."""
    read: list[int] = []

    def slow_inbox(topic, payload, mid, qos, dup, priority, hop):  # a full inbox: 2 ms an event, never acknowledged
        read.append(mid)
        time.sleep(0.002)

    with LocalBroker() as broker:
        conn = _connection(tmp_path, broker.port, slow_inbox, ["sensors/#"])
        sensor = _sensor(broker.port)
        acks = Acks()
        try:
            infos = [sensor.publish("sensors/a/x", b"e", qos=1) for _ in range(10_000)]
            [info.wait_for_publish(20) for info in infos]
            assert eventually(lambda: len(read) > 100, 5)  # the stream to us is busy now
            started = time.monotonic()
            for n in range(500):
                conn.publish("results/t", b"%d" % n, acks.callback(n))
            assert eventually(lambda: len(acks.calls) == 500, 5), f"{500 - len(acks.calls)} results await a PUBACK"
            assert len(read) < 10_000, "the events were all read first: the test proves nothing"
            assert set(acks.calls.values()) == {1}, time.monotonic() - started
        finally:
            sensor.loop_stop()
            conn.stop()


@pytest.mark.parametrize("answer", [b"", b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n"],
                         ids=["silent", "http"])
def test_a_port_that_is_not_a_brokers_is_said_within_seconds(tmp_path, caplog, answer):
    # A port that takes the TCP connection but never answers CONNECT left the daemon silent until
    # its keepalive (30 s); one that answers something else, silent for good.
    server = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []

    def serve() -> None:
        with contextlib.suppress(OSError):
            while True:
                peer, _ = server.accept()
                accepted.append(peer)
                if answer:
                    peer.recv(1024)
                    peer.sendall(answer)
                    peer.close()

    threading.Thread(target=serve, daemon=True).start()
    settings = load_settings(broker=f"mqtt://127.0.0.1:{server.getsockname()[1]}", state_dir=tmp_path / "state")
    conn = Connection(settings, lambda *a: None, ["sensors/#"], connack_wait=0.5)
    caplog.set_level(logging.WARNING, logger="edgefn.mqtt")
    conn.start()
    try:
        assert eventually(lambda: any("is it an MQTT broker?" in r.getMessage() for r in caplog.records), 5), \
            [r.getMessage() for r in caplog.records]
        assert "is it an MQTT broker?" in (conn.last_error or "")
        said = [r for r in caplog.records if "MQTT broker?" in r.getMessage()]
        assert len(said) == 1, [r.getMessage() for r in said]  # one line, not one per retry or per session
    finally:
        conn.stop()
        server.close()
        for peer in accepted:
            peer.close()


def test_a_drop_after_a_session_was_up_never_asks_whether_the_broker_is_mqtt(tmp_path, caplog):
    """paho may report one drop twice (its keepalive check, then its loop): the second call finds the
    session down already, and once said "closed the connection without answering CONNECT: is it an
    MQTT broker?" of a broker that had served the session for minutes."""
    from paho.mqtt.packettypes import PacketTypes as Packets
    from paho.mqtt.reasoncodes import ReasonCode

    from edgefn.mqtt.connection import _Link

    settings = load_settings(broker="mqtt://127.0.0.1:1", state_dir=tmp_path / "state")
    link = _Link(settings, "edgefn-twice", "events", 30, persistent=True)
    link.connected(ReasonCode(Packets.CONNACK, "Success"))
    keepalive = ReasonCode(Packets.DISCONNECT, "Keep alive timeout")
    link.disconnected(keepalive, was_connected=True)
    link.disconnected(keepalive, was_connected=False)
    assert "is it an MQTT broker" not in (link.last_error or "") + caplog.text
    assert link.last_error == "events connection lost: Keep alive timeout"


# -- writes from the publishing thread (PausableClient._write_inline) --------------------------------


def _daemon_client(broker: LocalBroker, tmp_path: Path) -> mqtt.Client:
    client = _connected_client(broker, tmp_path)
    connected = threading.Event()
    client.on_connect = lambda *_: connected.set()
    client.loop_start()
    assert connected.wait(5)
    return client


def test_a_publish_is_written_by_its_own_thread_while_pahos_is_busy(broker: LocalBroker, tmp_path: Path):
    """paho's thread held in a callback (as ingress holds it for a journal commit): a result published from
    another thread reaches the broker all the same, written by that thread. Queued for paho's thread, as
    paho does, it would wait for the callback to end."""
    results = Collector(broker.port, "results/#")
    client = _daemon_client(broker, tmp_path)
    busy, release = threading.Event(), threading.Event()

    def hold(*_: object) -> None:
        busy.set()
        release.wait(10)

    client.on_message = hold
    client.subscribe("hold", 1)
    try:
        publish(broker.port, "hold", [b"x"])
        assert busy.wait(5), "paho's thread was never in the callback"
        client.publish("results/inline", b"answer", qos=1)
        assert results.wait_for(1, timeout=3) == [("results/inline", b"answer")]
    finally:
        release.set()
        client.loop_stop()
        client.disconnect()
        results.close()


def test_writers_on_many_threads_keep_the_stream_whole(broker: LocalBroker, tmp_path: Path):
    """Four threads publish at once, payloads up to 512 KB (more than a socket takes at once: partly written
    inline, the rest by paho's thread): every message arrives whole, each thread's in its order."""
    results = Collector(broker.port, "results/#")
    client = _daemon_client(broker, tmp_path)
    sizes = [10, 3000, 70_000, 512_000]

    def writer(k: int) -> None:
        for i in range(60):
            body = f"{k}:{i}:".encode() + bytes([i % 251]) * sizes[(i + k) % len(sizes)]
            client.publish(f"results/{k}", body, qos=1)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        got = results.wait_for(240, timeout=30)
        assert len(got) == 240
        for k in range(4):
            mine = [body for topic, body in got if topic == f"results/{k}"]
            assert [int(b.split(b":")[1]) for b in mine] == list(range(60))  # type: ignore[union-attr]
            for body in mine:
                i = int(body.split(b":")[1])  # type: ignore[union-attr]
                head = f"{k}:{i}:".encode()
                assert body == head + bytes([i % 251]) * sizes[(i + k) % len(sizes)]
    finally:
        client.loop_stop()
        client.disconnect()
        results.close()


def test_a_client_not_yet_looping_writes_a_large_publish_without_hanging(broker: LocalBroker, tmp_path: Path):
    """Before loop_start paho writes from within the publish call: the part the socket did not take at once
    (of 32 MB) goes through paho's own write while the inline write still holds the writers' lock."""
    results = Collector(broker.port, "results/#")
    client = _connected_client(broker, tmp_path)
    body = bytes(range(256)) * (32 * 4096)
    published = threading.Thread(target=client.publish, args=("results/early", body), kwargs={"qos": 1}, daemon=True)
    published.start()
    published.join(10)
    try:
        assert not published.is_alive(), "publish() hung"
        client.loop_start()
        assert results.wait_for(1, timeout=20) == [("results/early", body)]
    finally:
        if not published.is_alive():  # else the client is stuck: leave it
            client.loop_stop()
            client.disconnect()
        results.close()


def _counting(client: mqtt.Client, name: str) -> list[int]:
    """Count the calls of one of the client's methods (the method itself still runs)."""
    calls: list[int] = []
    method = getattr(client, name)

    def counted(*args: object, **kwargs: object) -> object:
        calls.append(1)
        return method(*args, **kwargs)

    setattr(client, name, counted)
    return calls


def test_a_burst_is_read_many_packets_a_read_each_one_whole(broker: LocalBroker, tmp_path: Path):
    """A burst waiting in the socket is read a chunk at a time, not a packet (paho's own reads: three at least a
    packet, and one packet each time its loop wakes); every packet arrives whole and in order, one of 100 KB
    across several reads too."""
    client = _daemon_client(broker, tmp_path)
    got: list[bytes] = []
    first, release = threading.Event(), threading.Event()

    def on_message(c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        first.set()
        release.wait(10)  # the rest of the burst piles up in the socket meanwhile
        got.append(msg.payload)
        c.ack(msg.mid, msg.qos)

    client.on_message = on_message
    client.subscribe("burst/#", 1)
    bodies = [f"{i}:".encode() + (b"x" * 100_000 if i % 50 == 25 else b"y" * 200) for i in range(300)]
    recvs = _counting(client, "_sock_recv")
    try:
        time.sleep(0.3)  # the SUBACK
        sensor = _sensor(broker.port)
        sensor.publish("burst/one", bodies[0], qos=1)
        assert first.wait(5)
        for body in bodies[1:]:
            sensor.publish("burst/one", body, qos=1)
        time.sleep(1.0)  # the broker writes the rest to our socket
        release.set()
        assert eventually(lambda: len(got) == len(bodies), 20)
        assert got == bodies
        assert len(recvs) < 60, f"{len(recvs)} reads for {len(bodies)} packets"
    finally:
        release.set()
        client.loop_stop()
        client.disconnect()


def test_acknowledgements_of_a_group_go_out_in_one_write_and_the_broker_takes_them(tmp_path: Path):
    """ack_many: one packet of PUBACKs queued for 45 events; the broker takes every one of them: after a
    reconnect of the persistent session it sends again only the 5 left unacknowledged."""
    with LocalBroker() as broker:
        settings = load_settings(broker=broker.url, state_dir=tmp_path, client_id=f"acks-{time.monotonic_ns()}")
        got: list[tuple[bytes, bool]] = []
        mids: list[int] = []

        def on_message(_topic: str, payload: bytes, mid: int, _qos: int, dup: bool, *_: object) -> None:
            got.append((payload, dup))
            mids.append(mid)

        conn = Connection(settings, on_message, ["acks/#"])
        conn.start()
        try:
            conn.wait_connected(5)
            publish(broker.port, "acks/one", [b"%d" % i for i in range(50)])
            assert eventually(lambda: len(got) == 50, 10)
            queued = _counting(conn._sessions["normal"].link.client, "_packet_queue")
            conn.ack_many(mids[:45], "normal")
            assert len(queued) == 1
            time.sleep(0.5)  # the broker reads them
            got.clear()
            conn._sessions["normal"].link.drop()  # paho reconnects; the broker resends what was not acknowledged
            assert eventually(lambda: len(got) >= 5, 10)
            time.sleep(0.5)
            assert got == [(b"%d" % i, True) for i in range(45, 50)]
        finally:
            conn.stop()


def test_events_without_properties_skip_pahos_decoding_and_arrive_as_paho_would_hand_them(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A PUBLISH with no properties (most sensors' events) is handed over without paho's MQTTMessage and
    Properties; one with properties (a hop count) still goes paho's way. Topic, payload, QoS and hop count
    arrive alike either way."""
    import paho.mqtt.client as paho_client

    decoded: list[int] = []
    decode = paho_client._packet.decode_publish

    def counted(*args: object, **kwargs: object) -> object:
        decoded.append(1)
        return decode(*args, **kwargs)

    monkeypatch.setattr(paho_client._packet, "decode_publish", counted)
    with LocalBroker() as broker:
        settings = load_settings(broker=broker.url, state_dir=tmp_path, client_id=f"plain-{time.monotonic_ns()}")
        got: list[tuple[str, bytes, int, int]] = []

        def on_message(topic: str, payload: bytes, mid: int, qos: int, dup: bool, _p: object, hop: int) -> None:
            got.append((topic, payload, qos, hop))
            if qos:
                conn.ack(mid, qos)

        conn = Connection(settings, on_message, ["plain/#"])
        conn.start()
        sensor = _sensor(broker.port)
        try:
            conn.wait_connected(5)
            for i in range(50):
                sensor.publish(f"plain/{i % 3}", b"%d" % i, qos=i % 2)
            assert eventually(lambda: len(got) == 50, 10)
            assert decoded == []
            props = Properties(PacketTypes.PUBLISH)
            props.UserProperty = ("edgefn-hop", "3")
            sensor.publish("plain/hop", b"h\xffop", qos=1, properties=props)
            assert eventually(lambda: len(got) == 51, 10)
            assert len(decoded) == 1
        finally:
            sensor.loop_stop()
            sensor.disconnect()
            conn.stop()
    assert sorted(got[:50]) == sorted((f"plain/{i % 3}", b"%d" % i, i % 2, 0) for i in range(50))  # QoS 0 may pass QoS 1
    assert got[50] == ("plain/hop", b"h\xffop", 1, 3)


def test_plain_pubacks_skip_pahos_decoding_and_a_refusal_still_says_why(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch):
    """A PUBACK that only says success (nearly every answer's) is taken without paho's decoding; the
    broker's refusal (an ACL) still goes paho's way, with its reason."""
    import paho.mqtt.client as paho_client

    decoded: list[int] = []
    decode = paho_client._packet.decode_puback

    def counted(*args: object, **kwargs: object) -> object:
        decoded.append(1)
        return decode(*args, **kwargs)

    monkeypatch.setattr(paho_client._packet, "decode_puback", counted)
    acl = tmp_path / "acl"
    acl.write_text("topic readwrite results/#\n")
    with LocalBroker(extra_config=f"acl_file {acl}\n") as broker:
        settings = load_settings(broker=broker.url, state_dir=tmp_path, client_id=f"acks-{time.monotonic_ns()}")
        conn = Connection(settings, lambda *a: None, [])
        conn.start()
        acked: list[str | None] = []
        try:
            conn.wait_connected(5)
            for i in range(30):
                conn.publish(f"results/{i}", b"x", acked.append)
            assert eventually(lambda: len(acked) == 30, 10)
            assert acked == [None] * 30 and decoded == []
            conn.publish("elsewhere/denied", b"x", acked.append)
            assert eventually(lambda: len(acked) == 31, 10)
            assert acked[-1] is not None and "authori" in acked[-1].lower() and len(decoded) == 1
        finally:
            conn.stop()
