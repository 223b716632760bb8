"""What the broker refuses this client: a PUBACK or SUBACK reason code >= 0x80 (not authorized, quota
exceeded, ...), most often an ACL. One refused answer is like the next, so they are counted
(`edgefn_broker_refusals_total{kind,filter,reason}`), said once per filter and reason (then at most
once a minute, with a count) and held as a health problem until the broker takes that filter again.

A publish is counted under the publish filter of the function that may publish it (the manifest's
`[publish]`), else under its topic's first level (`edgefn/#`): topics carry device ids, filters
keep the label set bounded.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from prometheus_client import Counter

from edgefn.observe.logs import Every
from edgefn.topics import matches_any

log = logging.getLogger("edgefn.mqtt")

SAY_AGAIN_S = 60.0  # the same refusal is said again at most this often, with how many came since
_FILTER_CACHE_MAX = 4096  # topics remembered with their filter (device ids make topics many)


@dataclass
class _Refused:
    reason: str
    count: int  # refused since the broker last took this filter


class BrokerRefusals:
    """The refusals of one daemon's sessions. `publish_filters()` reads the running functions' publish
    filters (a release swap changes them)."""

    def __init__(self, counter: Counter, publish_filters: Callable[[], Iterable[str]] = tuple):
        self._counter, self._publish_filters = counter, publish_filters
        self._lock = threading.Lock()
        self._refused: dict[tuple[str, str], _Refused] = {}  # (kind, filter) -> until taken again
        self._said: dict[tuple[str, str, str], Every] = {}  # (kind, filter, reason): its line's gate
        self._filters: dict[str, str] = {}  # topic -> its filter

    # -- what the sessions hear ----------------------------------------------------------------------
    def published(self, topic: str, refused: str | None) -> None:
        """A PUBACK (paho's thread): None when the broker took the message, else its reason."""
        if refused is None:
            if self._refused:  # the usual case costs one truth test
                self._taken("publish", self.filter_of(topic))
            return
        self._count("publish", self.filter_of(topic), refused)

    def subscribed(self, topic_filter: str, refused: str | None) -> None:
        """One filter's SUBACK reason: None when granted."""
        if refused is None:
            self._taken("subscribe", topic_filter)
        else:
            self._count("subscribe", topic_filter, refused)

    # -- what health reads --------------------------------------------------------------------------
    def problem(self) -> str | None:
        """Why health is degraded: what the broker refuses now; None when it refuses nothing."""
        with self._lock:
            said = [f"the broker refuses {'subscribing to ' if kind == 'subscribe' else ''}{f} to this client: "
                    f"{r.reason.lower()}" for (kind, f), r in sorted(self._refused.items())]
        return "; ".join(said) or None

    def snapshot(self) -> dict[str, dict[str, dict[str, str | int]]]:
        """kind -> filter -> the reason and how many were refused since the broker last took it."""
        out: dict[str, dict[str, dict[str, str | int]]] = {}
        with self._lock:
            for (kind, f), r in sorted(self._refused.items()):
                out.setdefault(kind, {})[f] = {"reason": r.reason, "refused": r.count}
        return out

    def forget_filters(self) -> None:
        """The publish filters changed (a release swapped in): match topics afresh."""
        self._filters = {}

    def filter_of(self, topic: str) -> str:
        found = self._filters.get(topic)
        if found is None:
            found = next((f for f in self._publish_filters() if matches_any(topic, [f])), None)
            found = found or topic.partition("/")[0] + "/#"
            if len(self._filters) >= _FILTER_CACHE_MAX:
                self._filters.clear()
            self._filters[topic] = found
        return found

    # -- inside ---------------------------------------------------------------------------------------
    def _count(self, kind: str, topic_filter: str, reason: str) -> None:
        self._counter.labels(kind, topic_filter, reason).inc()
        with self._lock:
            held = self._refused.get((kind, topic_filter))
            if held is None or held.reason != reason:
                held = self._refused[(kind, topic_filter)] = _Refused(reason, 0)
            held.count += 1
            gate = self._said.setdefault((kind, topic_filter, reason), Every(SAY_AGAIN_S))
        if (skipped := gate.due()) is not None:
            what = "messages to" if kind == "publish" else "the subscription to"
            log.error("the broker refuses %s %s: %s (an ACL?%s; %d more since the last line)", what, topic_filter,
                      reason, " the answers stay in the outbox" if kind == "publish" else "", skipped)

    def _taken(self, kind: str, topic_filter: str) -> None:
        with self._lock:
            held = self._refused.pop((kind, topic_filter), None)
        if held is not None:
            log.warning("the broker takes %s %s again (%d refused before)",
                        "messages to" if kind == "publish" else "the subscription to", topic_filter, held.count)
