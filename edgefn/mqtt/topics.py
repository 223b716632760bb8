"""MQTT topic filters: matching a topic against the filters a function declares."""

from __future__ import annotations

from collections.abc import Iterable

from paho.mqtt.client import topic_matches_sub


def matches_any(topic: str, filters: Iterable[str]) -> bool:
    """True when `topic` matches one of the MQTT `filters` (`+` one level, `#` the rest)."""
    return any(topic_matches_sub(f, topic) for f in filters)


_FORBIDDEN = {chr(c) for c in (*range(0x00, 0x20), *range(0x7F, 0xA0), 0xFFFE, 0xFFFF)}


def topic_problem(topic: str) -> str | None:
    """Why `topic` cannot be published to (None when it can): a broker drops the connection of a
    client that sends a control character, and wildcards are for filters, not topics."""
    if not topic:
        return "is empty"
    if "+" in topic or "#" in topic:
        return "contains a wildcard (+ or #)"
    if any(ch in _FORBIDDEN for ch in topic):
        return "contains a control character"
    if len(topic.encode()) > 65_535:
        return "is longer than 65,535 bytes"
    return None
