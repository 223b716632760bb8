"""Priorities: a session per priority class, the most urgent events first, low-priority ones shed
under overload (counted, answered on the error topic), nothing lost. Against a real mosquitto and
the digits component where the daemon runs."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
from sklearn.datasets import load_digits

from edgefn.daemon import Daemon
from edgefn.dispatch.lanes import Lane, LoadedFunction
from edgefn.dispatch.share import Share
from edgefn.dispatch.worker import take
from edgefn.events import Event
from edgefn.functions.manifest import Manifest
from edgefn.journal.inbox import Inbox
from edgefn.journal.outbox import Pending
from edgefn.mqtt.ingress import Ingress
from edgefn.observe.window import HealthWindow
from edgefn.offload.planner import Planner
from tests.conftest import MODELS, eventually, publish

X, Y = load_digits(return_X_y=True)


def digits(prefix: str, n: int) -> list[bytes]:
    return [json.dumps({"id": f"{prefix}-{k}", "pixels": X[1400 + k % 300].astype(int).tolist()}).encode()
            for k in range(n)]


def digits_as(built: Path, root: Path, name: str, trigger: str, limits: str = "", extra: str = "") -> Path:
    """The built digits function under another name (its component copied: the name is not in it),
    with this [trigger] section, and the digits model under that name (the function asks for its
    namesake) in root/models."""
    folder, models = root / "functions" / name, root / "models" / name
    (folder / "build").mkdir(parents=True)
    models.mkdir(parents=True)
    shutil.copy(built / "app.py", folder)
    (folder / "edgefn.toml").write_text(
        f'{extra}\n[function]\nname = "{name}"\nversion = "1.0.0"\n\n[trigger]\n{trigger}\n\n'
        f'[publish]\ntopics = ["results/+/{name}"]\n\n[models]\nuse = ["{name}"]\n\n[limits]\n{limits}\n')
    shutil.copy(built / "build" / "digits.wasm", folder / "build" / f"{name}.wasm")  # newer than its sources
    for f in (MODELS / "digits").iterdir():
        if f.name != "model.json":
            (models / f.name).symlink_to(f)
    meta = json.loads((MODELS / "digits" / "model.json").read_text())
    (models / "model.json").write_text(json.dumps({**meta, "name": name}))
    return folder


@pytest.fixture()
def run(broker, settings_for, started):
    def make(*functions: Path, **extra: object) -> Daemon:
        models = [MODELS, *{f.parent.parent / "models" for f in functions}]
        return started(settings_for(broker, *functions, models=models, **extra))

    return make


def _ids(messages: list[tuple[str, object]], function: str) -> list[str]:
    return [doc["event_id"] for _, doc in messages if isinstance(doc, dict) and doc.get("function") == function]


# -- the manifest -----------------------------------------------------------------------------------------
def test_a_topic_takes_the_highest_priority_of_the_filters_that_match_it():
    m = Manifest.model_validate({"function": {"name": "f", "version": "1"}, "trigger": {
        "topics": ["sensors/#", "sensors/+/alarm"], "priority": "low", "priorities": {"sensors/+/alarm": "high"}}})
    assert m.trigger.priority_of("sensors/a/alarm") == "high"
    assert m.trigger.priority_of("sensors/a/temp") == "low"
    assert m.trigger.filters_by_priority() == {"high": ["sensors/+/alarm"], "low": ["sensors/#"]}
    plain = Manifest.model_validate({"function": {"name": "f", "version": "1"}, "trigger": {"topics": ["a/b"]}})
    assert plain.trigger.priority_of("a/b") == "normal" and not plain.trigger.shed  # manifests before priorities


# -- sessions: one per class in use, each event once per function ---------------------------------------
def test_sessions_are_opened_only_for_the_classes_in_use(run, digits_fn):
    d = run(digits_fn)
    assert d.connection.sessions == {"normal": d.settings.client_id}, "all normal: the one session as before"
    assert d.health()["broker_sessions"] == {"normal": d.settings.client_id}


def test_an_event_of_two_classes_comes_on_two_sessions_and_each_function_answers_it_once(
        run, digits_fn, tmp_path, broker, collector):
    alarm = digits_as(digits_fn, tmp_path, "alarm", 'topics = ["sensors/+/digits"]\npriority = "high"')
    results = collector("results/#")
    d = run(digits_fn, alarm)
    cid = d.settings.client_id
    assert d.connection.sessions == {"normal": cid, "high": f"{cid}-high"}
    publish(broker.port, "sensors/dev1/digits", digits("both", 100))
    assert eventually(lambda: len(results.messages) >= 200, 20), len(results.messages)
    time.sleep(0.5)  # a second answer of either function would come by now
    for function in ("digits", "alarm"):
        got = _ids(results.messages, function)
        assert sorted(got) == sorted(f"both-{k}" for k in range(100)), f"{function}: each event once"
    assert eventually(lambda: len(d.inbox) == 0, 5), "each copy journaled and settled"


# -- the most urgent first --------------------------------------------------------------------------------
def _function(topics: dict, instances: int = 1) -> LoadedFunction:
    manifest = Manifest.model_validate({"function": {"name": "f", "version": "1"}, "trigger": topics})
    return LoadedFunction(manifest, None, [], Planner("never", 100, instances),  # type: ignore[arg-type]
                          {"local": Lane("local", instances)}, HealthWindow(), Share(1000, 1 << 20))


def test_a_lane_hands_out_high_priority_events_first_each_class_in_arrival_order():
    fn = _function({"topics": ["telemetry/#", "alarms/#"], "priority": "low", "priorities": {"alarms/#": "high"}})
    for i in range(6):
        topic = "alarms/a" if i in (2, 5) else "telemetry/a"
        event = Event(str(i), topic, b"x", time.time() * 1000)
        fn.offer(event, Pending.of(event, 1), False)
    batch = take(fn.local.queue, 3)
    assert [item[0].id for item in batch] == ["2", "5", "0"], "the alarms ahead of the telemetry queued before"
    published: list[str] = []
    for event, _, ticket in reversed(batch[:2]):  # answered out of order: each class leaves in its own order
        fn.local.order.release(ticket, lambda e=event: published.append(e.id))
    assert published == ["2", "5"], "a high answer waits for no low one queued before it"
    fn.local.order.release(batch[2][2], lambda: published.append("0"))
    assert published == ["2", "5", "0"]


def test_room_in_the_inbox_goes_to_held_high_priority_events_first_and_reading_pauses_them_last(tmp_path):
    inbox = Inbox(tmp_path / "inbox.sqlite")
    acked: list[tuple[int, str]] = []
    pauses: list[tuple[str, bool]] = []
    delivered: list[Event] = []
    ingress = Ingress(inbox, 1, delivered.extend, lambda mid, qos, priority: acked.append((mid, priority)),
                      lambda: False, max_held_bytes=2000,
                      pause=lambda p: pauses.append(("normal+low", p)), pause_high=lambda p: pauses.append(("high", p)))
    ingress.on_message("t/low", b"x" * 100, 1, 1, False, "low")  # the inbox (1 event) is full now
    ingress.on_message("t/high", b"x" * 100, 1, 1, False, "high")  # but for high events' headroom (1.25)
    ingress.on_message("t/low", b"x" * 700, 2, 1, False, "low")  # held
    ingress.on_message("t/normal", b"x" * 700, 1, 1, False, "normal")  # held
    assert pauses == [], "1,400 bytes and their overhead held, of 2,000"
    ingress.on_message("t/high", b"x" * 300, 2, 1, False, "high")  # held: past 2,000, normal and low pause
    assert pauses == [("normal+low", True)], "the high session keeps reading"
    ingress.on_message("t/high", b"x" * 300, 3, 1, False, "high")  # held: past 2,500, the high one pauses too
    assert pauses == [("normal+low", True), ("high", True)]
    assert [e.topic for e in delivered] == ["t/low", "t/high"] and acked == [(1, "low"), (1, "high")]
    for _ in range(5):
        ingress.answered(1)
    assert [(e.topic, e.priority) for e in delivered[2:]] == [
        ("t/high", "high"), ("t/high", "high"), ("t/normal", "normal"), ("t/low", "low")], "the most urgent first"
    assert acked[2:] == [(2, "high"), (3, "high"), (1, "normal"), (2, "low")], "each on its own session"
    assert pauses[2:] == [("high", False), ("normal+low", False)], "both read again at half the bound"
    inbox.close()


def test_under_contention_alarms_are_answered_ahead_of_a_backlog_of_slow_events(run, hostile_fn, tmp_path, broker,
                                                                              collector):
    """One instance busy with a backlog of events that each run to the 300 ms deadline: high-priority
    events published after them are answered while most of the backlog still waits (in one queue
    they would wait for all of it, about 4 s)."""
    folder = tmp_path / "hostile"
    shutil.copytree(hostile_fn, folder)
    manifest = (folder / "edgefn.toml").read_text().replace(
        'topics = ["sensors/+/hostile"]',
        'topics = ["sensors/+/hostile", "alarms/+/hostile"]\npriority = "low"\npriorities = { "alarms/+/hostile" = "high" }'
    ).replace("instances = 1", "instances = 1\nmax_batch = 1")  # a batch taken runs whole: one event at a time
    (folder / "edgefn.toml").write_text(manifest)
    (folder / "build" / "hostile.wasm").touch()  # newer than its sources
    results, errors = collector("results/+/hostile"), collector("edgefn/errors/hostile")
    run(folder)
    # Each loop a payload of its own: the same one thrice would be quarantined.
    publish(broker.port, "sensors/d1/hostile", [b"loop" + b" " * i for i in range(12)])
    assert eventually(lambda: len(errors.messages) >= 1, 5), "the backlog is being served"
    publish(broker.port, "alarms/a1/hostile", [b"ok"] * 5)
    sent = time.monotonic()
    assert eventually(lambda: len(results.messages) == 5, 10), "the alarms were answered"
    took, timed_out = time.monotonic() - sent, len(errors.messages)
    assert timed_out <= 9, f"{timed_out} of 12 slow events ran before the alarms published after them"
    assert took < 1.5, f"the alarms took {took:.1f} s: they waited for more than the one event running"
    assert eventually(lambda: len(errors.messages) == 12, 10), "and the backlog, all of it"
    assert all(doc["reason"] == "timeout" for _, doc in errors.messages)


# -- shedding ---------------------------------------------------------------------------------------------
def test_low_priority_events_are_shed_under_overload_to_the_error_topic_counted_and_none_lost(
        run, digits_fn, tmp_path, broker, collector):
    shedding = digits_as(digits_fn, tmp_path, "shedding",
                         'topics = ["sensors/+/bulk", "alarms/+/shedding"]\npriority = "low"\nshed = true\n'
                         'priorities = { "alarms/+/shedding" = "high" }', "instances = 1",
                         extra="latency_budget_ms = 20")
    results, errors = collector("results/#"), collector("edgefn/errors/#")
    d = run(shedding)
    publish(broker.port, "sensors/b1/bulk", digits("low", 3000))
    publish(broker.port, "alarms/a1/shedding", digits("high", 50))
    answered = lambda: len(results.messages) + len(errors.messages)  # noqa: E731
    assert eventually(lambda: answered() >= 3050, 60), answered()
    time.sleep(0.5)
    shed = [doc for _, doc in errors.messages]
    assert shed and all(doc["reason"] == "shed" and doc["function"] == "shedding" for doc in shed)
    assert all(doc["event_id"].startswith("low-") for doc in shed), "high-priority events are never shed"
    ran = _ids(results.messages, "shedding")
    assert sorted(ran + [doc["event_id"] for doc in shed]) == sorted(
        [f"low-{k}" for k in range(3000)] + [f"high-{k}" for k in range(50)]), "every event answered once"
    assert {f"high-{k}" for k in range(50)} <= set(ran)
    text = d.metrics.render().decode()
    counted = next(float(line.split()[-1]) for line in text.splitlines()
                   if line.startswith('edgefn_events_handled_total{function="shedding",outcome="shed"}'))
    assert counted == len(shed)
    assert eventually(lambda: len(d.inbox) == 0 and d.outbox.rows == 0, 5), "settled once the notices were out"
