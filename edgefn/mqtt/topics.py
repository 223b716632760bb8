"""MQTT topic filters: matching a topic against the filters a function declares."""

from __future__ import annotations

from collections.abc import Iterable

from paho.mqtt.client import topic_matches_sub


def matches_any(topic: str, filters: Iterable[str]) -> bool:
    """True when `topic` matches one of the MQTT `filters` (`+` one level, `#` the rest)."""
    return any(topic_matches_sub(f, topic) for f in filters)


def level(topic: str, index: int) -> str:
    """The `index`-th level of a topic ('' when it has fewer levels)."""
    parts = topic.split("/")
    return parts[index] if index < len(parts) else ""
