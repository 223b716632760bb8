"""MQTT topic names and filters, in one place: which names and filters are valid, which topics a filter
matches, and the topics edgefn itself publishes to (`edgefn/errors/<function>`).

A topic name is what a message is published to (`sensors/dev7/digits`); a filter is what a function
subscribes to or may publish to (`sensors/+/digits`, `results/#`). Matching is paho-mqtt's
(`paho.mqtt.matcher`, a small module that does not load the client).

A shared subscription (MQTT 5), `$share/GROUP/FILTER`, is subscribed to as written, and the broker
hands each message on FILTER to one member of GROUP, with its own topic (`sensors/dev7/digits`): so
such a trigger matches topics with FILTER (`match_filter`). GROUP is one level without wildcards,
and FILTER a valid filter of its own.
"""

from __future__ import annotations

from collections.abc import Iterable

from paho.mqtt.client import topic_matches_sub

# Where an event that a function could not handle goes, with the reason.
ERRORS_TOPIC = "edgefn/errors/{function}"
ERRORS_PREFIX = ERRORS_TOPIC.format(function="")
ERRORS_FILTER = ERRORS_TOPIC.format(function="#")
# Where an event goes that the broker delivered and no function takes (a function may not take this name).
UNROUTED = "unrouted"
UNROUTED_TOPIC = ERRORS_TOPIC.format(function=UNROUTED)
SHARE_PREFIX = "$share/"

_FORBIDDEN = {chr(c) for c in (*range(0x00, 0x20), *range(0x7F, 0xA0), 0xFFFE, 0xFFFF)}
_MAX_BYTES = 65_535


def is_errors_topic(topic: str) -> bool:
    """True for a topic under edgefn/errors/ (an event some function could not handle)."""
    return topic.startswith(ERRORS_PREFIX)


def is_shared(topic_filter: str) -> bool:
    """True for a shared subscription's filter, `$share/GROUP/FILTER`."""
    return topic_filter.startswith(SHARE_PREFIX)


def match_filter(topic_filter: str) -> str:
    """What a subscription to `topic_filter` matches topics with: FILTER of `$share/GROUP/FILTER`, else
    the filter itself."""
    if is_shared(topic_filter):
        return topic_filter[len(SHARE_PREFIX):].partition("/")[2]
    return topic_filter


def matches_any(topic: str, filters: Iterable[str]) -> bool:
    """True when `topic` matches one of the MQTT `filters` (`+` one level, `#` the rest; a shared
    subscription's by its FILTER)."""
    return any(topic_matches_sub(match_filter(f), topic) for f in filters)


def filters_overlap(a: str, b: str) -> bool:
    """True when some topic matches both MQTT filters (`+` one level, `#` the rest, the parent too)."""
    left, right = a.split("/"), b.split("/")
    for i in range(max(len(left), len(right))):
        x = left[i] if i < len(left) else None
        y = right[i] if i < len(right) else None
        if x == "#" or y == "#":
            return True  # both matched every level before it, and `#` takes whatever follows
        if x is None or y is None:
            return False  # one ends here and the other goes on without a `#`
        if x != y and "+" not in (x, y):
            return False
    return True


def example_topic(topic_filter: str, device: str = "dev1") -> str:
    """A topic `topic_filter` matches: each `+` as `device`, a `#` as "test" (`sensors/+/t` -> `sensors/dev1/t`)."""
    levels = match_filter(topic_filter).split("/")
    return "/".join(device if level == "+" else "test" if level == "#" else level for level in levels)


def topic_problem(topic: str) -> str | None:
    """Why `topic` cannot be published to (None when it can): a broker drops the connection of a
    client that sends a control character, and wildcards are for filters, not topics."""
    if "+" in topic or "#" in topic:
        return "contains a wildcard (+ or #)"
    return _common_problem(topic)


def filter_problem(topic_filter: str) -> str | None:
    """Why `topic_filter` is not a valid MQTT topic filter (None when it is): `+` must fill a whole
    level, `#` a whole level and the last one; `$share/GROUP/FILTER` needs a GROUP (one level, no
    wildcard) and a FILTER valid of its own."""
    if topic_filter == SHARE_PREFIX[:-1] or is_shared(topic_filter):
        return _share_problem(topic_filter)
    levels = topic_filter.split("/")
    if any(("#" in lv and lv != "#") or ("+" in lv and lv != "+") for lv in levels) or "#" in levels[:-1]:
        return "has a wildcard that is not a whole level (+, or # as the last level)"
    return _common_problem(topic_filter)


def check_filter(topic_filter: str) -> str:
    """`topic_filter` itself, or ValueError saying it is not a valid MQTT topic filter (for validators)."""
    problem = filter_problem(topic_filter)
    if problem:
        raise ValueError(f"{topic_filter!r} is not a valid MQTT topic filter: it {problem}")
    return topic_filter


def _share_problem(topic_filter: str) -> str | None:
    group, slash, rest = topic_filter[len(SHARE_PREFIX):].partition("/")
    if not group:
        return "is a shared subscription with no group name ($share/GROUP/FILTER)"
    if "+" in group or "#" in group:
        return f"is a shared subscription whose group name {group!r} has a wildcard (+ or #)"
    if not slash or not rest:
        return "is a shared subscription with no filter after its group ($share/GROUP/FILTER)"
    if is_shared(rest):
        return "is a shared subscription of a shared subscription ($share/GROUP/FILTER, once)"
    problem = filter_problem(rest)
    if problem:
        return f"is a shared subscription whose filter {rest!r} {problem}"
    return _common_problem(topic_filter)


def _common_problem(text: str) -> str | None:
    if not text:
        return "is empty"
    if any(ch in _FORBIDDEN for ch in text):
        return "contains a control character"
    if len(text.encode()) > _MAX_BYTES:
        return "is longer than 65,535 bytes"
    return None
