"""The two values that flow through the daemon: an event in, messages out."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# How urgent an event is to a function (its manifest's [trigger] priority); first in this order.
Priority = Literal["high", "normal", "low"]
PRIORITIES: tuple[Priority, ...] = ("high", "normal", "low")
RANK: dict[str, int] = {p: i for i, p in enumerate(PRIORITIES)}  # 0 is the most urgent


@dataclass(frozen=True, slots=True)
class Event:
    """One sensor message, as received and journaled."""

    id: str
    topic: str
    payload: bytes
    received_ms: float  # host wall clock, milliseconds since the epoch
    replayed: bool = False  # run again after a restart: its outputs may have been delivered before
    dropped: int = 0  # payload bytes not kept (over max_payload_bytes): `payload` holds only its head
    # The priority class of the session it came on: it goes to the functions that take its topic at
    # that priority (None: to every function its topic triggers, as journaled before priorities).
    priority: Priority | None = None
    shed: bool = False  # dropped under overload: answered with reason "shed", never run
    hop: int = 0  # functions the chain of events behind it went through (its edgefn-hop; a sensor's: 0)


@dataclass(frozen=True, slots=True)
class Message:
    """One message a function asks to publish."""

    topic: str
    payload: bytes
    qos: int = 1  # 1: until the broker's PUBACK (kept in the outbox); 0: at most once
    retain: bool = False
    properties: tuple[tuple[str, str], ...] = ()  # the function's MQTT 5 user properties
