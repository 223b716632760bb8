"""The two values that flow through the daemon: an event in, messages out."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Event:
    """One sensor message, as received and journaled."""

    id: str
    topic: str
    payload: bytes
    received_ms: float  # host wall clock, milliseconds since the epoch
    replayed: bool = False  # run again after a restart: its outputs may have been delivered before
    dropped: int = 0  # payload bytes not kept (over max_payload_bytes): `payload` holds only its head


@dataclass(frozen=True, slots=True)
class Message:
    """One message a function asks to publish."""

    topic: str
    payload: bytes
    qos: int = 1  # 1: until the broker's PUBACK (kept in the outbox); 0: at most once
    retain: bool = False
    properties: tuple[tuple[str, str], ...] = ()  # the function's MQTT 5 user properties
