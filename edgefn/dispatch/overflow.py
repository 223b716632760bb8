"""A function's events past its budget in the journal: shed at once, never silently.

A flood of one function must not wait in everyone's way: its events beyond its budget in the
journal (dispatch/share.py) are journaled and acknowledged like every event, then answered at once
on `edgefn/errors/<function>` with reason `shed` instead of waiting to run. So intake never stops
reading because of one function, and the broker never drops anyone's events for it. Each such
event is counted in `edgefn_events_handled_total{outcome="shed"}`, and the log says so at most
once per `LOG_EVERY_S` per function (the count since the last line), never a line per event under
the very flood. Its answer skips the function's lanes, so it may leave ahead of that function's
answers to earlier events.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import replace

from edgefn.dispatch.lanes import LoadedFunction
from edgefn.dispatch.worker import error_message
from edgefn.errors import Shed
from edgefn.events import Event, Message
from edgefn.journal.outbox import Pending
from edgefn.observe.logs import Every
from edgefn.observe.metrics import Metrics
from edgefn.protocol.outputs import HOP

log = logging.getLogger("edgefn.dispatch")

LOG_EVERY_S = 10.0
Answer = Callable[[Pending, list[Message], Sequence[tuple[str, str]], bool], None]  # Outbox.answer


class Overflow:
    """Answers, counts and logs the events a function sheds past its budget in the journal (`__call__`)."""

    def __init__(self, answer: Answer, metrics: Metrics):
        self._answer, self._metrics = answer, metrics
        self._lock = threading.Lock()
        self._said: dict[str, Every] = {}

    def __call__(self, event: Event, pending: Pending, fn: LoadedFunction) -> None:
        share = fn.share
        exc = Shed(f"{fn.name} holds {share.events + len(share.parked)} events journaled and not yet answered, "
                   f"its budget in the journal is {share.budget_events} (journal_weight "
                   f"{fn.manifest.limits.journal_weight:g}): shed without running")
        self._metrics.events_handled.labels(fn.name, exc.reason).inc()
        with self._lock:
            gate = self._said.setdefault(fn.name, Every(LOG_EVERY_S))
        if (skipped := gate.due()) is not None:
            log.warning("%s: past its budget in the journal, new events are shed (reason shed on its error topic): "
                        "%s (%d more since the last line)", fn.name, exc, skipped)
        message = error_message(fn.manifest, event, exc)
        message = replace(message, properties=((HOP, str(event.hop + 1)),))  # one hop further, as every answer
        self._answer(pending, [message], fn.properties, event.priority == "high")
