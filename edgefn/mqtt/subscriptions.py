"""Subscriptions: the topic filters the daemon's session is subscribed to, kept so across reconnects
and release swaps.

Nothing waits for a SUBACK: mosquitto writes it behind everything it resends to us, and
2.0.16-2.0.20 drop it outright (with any other packet) once a client has `max_queued_messages`
packets unwritten. A SUBACK that does not come within `suback_timeout` (4 s: with the watchdog's
1 s tick, asked again within 5 s) is asked for again (`retry_late`, from the session's watchdog).
At 30 s, a restart with 30,000 messages to resend gave its first answer after 44 s when its SUBACK
was lost behind them. Asking early is cheap, even for a SUBACK that was only late: the broker replaces the
subscription with the same one, and the retry asks for retained messages only where the
subscription is new (MQTT 5's Retain Handling), so none comes twice.

The broker keeps a persistent session's subscriptions across restarts: what was subscribed before
(by an earlier release, with other triggers) is recorded in the subscriptions file and dropped on
the next connect.

Locks, nested in this order only: paho's own -> `_filters_lock` -> `_lock`.
- `_filters_lock` guards the filters and subscribing to them on connect, with
  the session's `connected` flag set under it: `set_filters` either sees the connection up and
  subscribes itself, or changes the filters before the connect subscribes to them. Only paho's
  thread (in its CONNACK callback) calls paho while holding it.
- `_lock` guards the SUBSCRIBEs awaiting their SUBACK; never held while calling paho.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.subscribeoptions import SubscribeOptions

from edgefn.files import write_atomic
from edgefn.observe.logs import Every

log = logging.getLogger("edgefn.mqtt")

SUBACK_TIMEOUT_S = 4.0  # no SUBACK this long: subscribe again
OnSuback = Callable[[str, "str | None"], None]


class Subscriptions:
    """The filters of one paho client's session. `connected` is the session's flag, set here once
    a connect has subscribed (see the module docstring)."""

    def __init__(self, client: mqtt.Client, filters: Sequence[str], connected: threading.Event,
                 subscriptions_file: Path | None = None, suback_timeout: float = SUBACK_TIMEOUT_S,
                 on_suback: OnSuback | None = None):
        self._client, self._connected = client, connected
        self._on_suback = on_suback  # (filter, None or why the broker refused it): counted and said there
        self.suback_timeout = suback_timeout
        self._filters_lock = threading.Lock()  # the filters, and subscribing to them on connect
        self._filters = list(filters)
        self._file = subscriptions_file
        self._subscribed = set(self._recorded())  # as the broker's session last had them, as far as we know
        self._lock = threading.Lock()  # the SUBSCRIBEs awaiting their SUBACK
        self._pending: dict[int, tuple[list[str], float]] = {}  # SUBSCRIBE mid -> filters, sent at
        self._late_subacks, self._refused = Every(10.0), Every(10.0)

    @property
    def awaiting_suback(self) -> int:
        with self._lock:
            return len(self._pending)

    def resubscribe(self) -> None:
        """On a CONNACK (paho's thread): subscribe to the filters, drop the stale ones the broker's
        session may keep, then mark the session connected."""
        with self._lock:
            self._pending.clear()
        with self._filters_lock:  # set_filters sees the filters subscribed here, or changes them before
            if self._filters:
                self._subscribe(self._filters)
            stale = sorted(self._subscribed - set(self._filters))
            if stale:
                self._client.unsubscribe(stale)
            self._record(self._filters)
            self._connected.set()

    def set_filters(self, filters: Sequence[str]) -> None:
        """Subscribe to `filters` instead of the current ones (a new release's triggers). While
        disconnected, the next connect subscribes to them."""
        with self._filters_lock:
            old, self._filters = set(self._filters), list(filters)
            if not self._connected.is_set():
                return
        added, removed = [f for f in filters if f not in old], sorted(old - set(filters))
        # New ones first: no event for the new functions is missed while the old ones go.
        if added:
            self._subscribe(added)
        if removed:
            self._client.unsubscribe(removed)
        self._record(filters)

    def acknowledged(self, mid: int, reasons: list[mqtt.ReasonCode]) -> None:
        """The broker's SUBACK for `mid` (paho's thread)."""
        with self._lock:
            filters, _ = self._pending.pop(mid, ([], 0.0))
        refused = [f"{f}: {r}" for f, r in zip(filters, reasons, strict=False) if r.is_failure]
        granted = [f for f, r in zip(filters, reasons, strict=False) if not r.is_failure]
        if granted:  # the one line that shows a trigger with a typo: what the broker will send us
            log.info("subscribed to %s", ", ".join(granted))
        if self._on_suback is not None:
            for f, r in zip(filters, reasons, strict=False):
                self._on_suback(f, str(r) if r.is_failure else None)
        elif refused and (skipped := self._refused.due()) is not None:
            log.error("the broker refused the subscription to %s (%d more since the last line)", "; ".join(refused), skipped)

    def retry_late(self, now: float) -> None:
        """Subscribe again to what has had no SUBACK for `suback_timeout` (the watchdog's thread)."""
        with self._lock:
            late = [(mid, filters) for mid, (filters, at) in self._pending.items() if now - at > self.suback_timeout]
        for mid, filters in late:
            with self._lock:
                self._pending.pop(mid, None)
            with self._filters_lock:  # only what is still wanted: a release swap may have dropped some
                filters = [f for f in filters if f in self._filters]
                if not filters:
                    continue
                if (skipped := self._late_subacks.due()) is not None:
                    log.warning("no SUBACK for %s within %g s: subscribing again (%d more since the last line)",
                                ", ".join(filters), self.suback_timeout, skipped)
                self._subscribe(filters, retained=SubscribeOptions.RETAIN_SEND_IF_NEW_SUB)

    def _subscribe(self, filters: list[str], retained: int = SubscribeOptions.RETAIN_SEND_ON_SUBSCRIBE) -> None:
        options = SubscribeOptions(qos=1, retainHandling=retained)
        rc, mid = self._client.subscribe([(f, options) for f in filters])
        if rc == mqtt.MQTT_ERR_SUCCESS and mid is not None:
            with self._lock:
                self._pending[mid] = (list(filters), time.monotonic())

    def _recorded(self) -> list[str]:
        if self._file is None:
            return []
        try:
            return [str(f) for f in json.loads(self._file.read_bytes())]
        except (OSError, ValueError, TypeError):
            return []  # none recorded yet (or unreadable: the broker's session may keep a few extra)

    def _record(self, filters: Sequence[str]) -> None:
        if set(filters) == self._subscribed:
            return  # a reconnect to the same subscriptions writes nothing
        self._subscribed = set(filters)
        if self._file is not None:
            try:
                write_atomic(self._file, json.dumps(sorted(filters)).encode())
            except OSError as exc:
                log.warning("%s: cannot record the subscriptions: %s", self._file, exc)
