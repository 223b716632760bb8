"""Events the broker delivered that no function takes: never acknowledged and then dropped without a word.

An event is journaled and acknowledged before it is routed, so one whose topic matches no trigger of
the functions running now has nowhere to go. It happens when the broker's session holds a
subscription no function holds (one kept from an earlier release, a swap between the broker's send
and the routing, a journal replayed after the functions changed) or when a trigger's filter is
subscribed as one thing and matched as another (while `$share/GROUP/FILTER` triggers were matched as
written, every event of theirs ended here, unseen). Each such event is:

- answered on `edgefn/errors/unrouted` (`UNROUTED_TOPIC`), through the outbox like any function's
  error (`edgefn/errors/<function>`): its `edgefn-event` user property, and a JSON body with the same
  fields (`event_id`, `topic`, `reason` "unrouted", `error`: why, `journal_id`; `function` null);
- counted in `edgefn_events_unrouted_total`;
- logged, at most once a minute per topic (`LOG_EVERY_S`, with the count since the last line);
- and `/healthz` is degraded, saying why, until `HEALTH_S` have passed without one.

An event on an `edgefn/errors/...` topic is counted and logged but answers nothing: its answer
would be published where it came from (a subscription left over from an error handler), again and again.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Sequence

from edgefn.dispatch.worker import error_body
from edgefn.events import Event, Message
from edgefn.journal.outbox import Pending
from edgefn.observe.logs import Every
from edgefn.observe.metrics import Metrics
from edgefn.protocol.outputs import HOP
from edgefn.topics import UNROUTED, UNROUTED_TOPIC, is_errors_topic

log = logging.getLogger("edgefn.dispatch")

LOG_EVERY_S = 60.0  # the most a topic's unrouted events are logged: a line a minute
HEALTH_S = 60.0  # /healthz stays degraded this long after the last unrouted event
_TOPICS_LOGGED = 1024  # topics with a log gate of their own; the rest share one
_TRIGGERS_SHOWN = 8  # of the functions' triggers, named in the error's text

Answer = Callable[[Pending, list[Message], Sequence[tuple[str, str]]], None]  # Outbox.answer


class Unrouted:
    """Answers, counts and logs the events no function takes (`__call__`, after routing); says so in
    `problem()` for /healthz."""

    def __init__(self, answer: Answer, done: Callable[[Pending], None], metrics: Metrics,
                 triggers: Callable[[], list[str]]):
        self._answer, self._done, self._metrics, self._triggers = answer, done, metrics, triggers
        self._lock = threading.Lock()
        self._gates: dict[str, Every] = {}
        self._other_topics = Every(LOG_EVERY_S)
        self.events = 0
        self.last: tuple[str, str, float] | None = None  # topic, why, when (monotonic)

    def why(self, topic: str) -> str:
        triggers = self._triggers()
        if not triggers:
            return f"no function runs here to take {topic}"
        shown = ", ".join(triggers[:_TRIGGERS_SHOWN]) + (", ..." if len(triggers) > _TRIGGERS_SHOWN else "")
        return (f"{topic} matches no trigger of the functions running here ({shown}): the broker sent it on a "
                "subscription no function holds")

    def __call__(self, event: Event, pending: Pending) -> None:
        """`pending` counts one function (this): answered here, it leaves the inbox at the next settle."""
        why = self.why(event.topic)
        with self._lock:
            self.events += 1
            self.last = (event.topic, why, time.monotonic())
            gate = self._gates.get(event.topic)
            if gate is None:
                gate = self._other_topics
                if len(self._gates) < _TOPICS_LOGGED:
                    gate = self._gates[event.topic] = Every(LOG_EVERY_S)
        self._metrics.events_unrouted.inc()
        echo = is_errors_topic(event.topic)
        if (skipped := gate.due()) is not None:
            log.warning("event %s on %s went to no function: %s; %s (%d more like it since the last line)",
                        event.id, event.topic, why,
                        "not answered: it came on an error topic" if echo else f"answered on {UNROUTED_TOPIC}",
                        skipped)
        if echo:
            self._done(pending)
            return
        body = error_body(event, UNROUTED, why)
        # One hop further, as every answer: a function on edgefn/errors/# that publishes where only a stale
        # subscription listens would otherwise go round at hop 0 for ever.
        hop = ((HOP, str(event.hop + 1)),)
        self._answer(pending, [Message(UNROUTED_TOPIC, json.dumps(body).encode(), properties=hop)], ())

    def problem(self) -> str | None:
        """Why /healthz is degraded: events went to no function within the last `HEALTH_S` (None: none did)."""
        with self._lock:
            if self.last is None:
                return None
            topic, why, at = self.last
            events = self.events
        ago = time.monotonic() - at
        if ago > HEALTH_S:
            return None
        return (f"{events} events went to no function (answered on {UNROUTED_TOPIC}), the last {ago:.0f} s ago: {why}")

    def snapshot(self) -> dict | None:
        """For /healthz: how many, and the last one's topic and why (None: none yet)."""
        with self._lock:
            if self.last is None:
                return None
            topic, why, at = self.last
            return {"events": self.events, "last_topic": topic, "last_s_ago": round(time.monotonic() - at, 1),
                    "why": why}
