"""MQTT topic names and filters (edgefn/topics.py): matching, and what a valid name and filter are."""

from __future__ import annotations

import pytest

from edgefn.topics import (
    ERRORS_FILTER,
    ERRORS_TOPIC,
    check_filter,
    example_topic,
    filter_problem,
    filters_overlap,
    is_errors_topic,
    match_filter,
    matches_any,
    topic_problem,
)


@pytest.mark.parametrize(("topic", "filters", "expected"), [
    ("sensors/dev7/digits", ["sensors/+/digits"], True),
    ("sensors/dev7/digits", ["results/#", "sensors/#"], True),
    ("sensors/dev7/x/digits", ["sensors/+/digits"], False),
    ("sensors", ["sensors/#"], True),  # '#' also matches the parent level
    ("$SYS/load", ["#"], False),  # '$' topics are not matched by a leading wildcard
    ("sensors/dev7/digits", ["$share/g1/sensors/+/digits"], True),  # a shared subscription: by its filter
    ("sensors/dev7/digits", ["$share/g1/#"], True),
    ("$share/g1/sensors/dev7/digits", ["$share/g1/sensors/+/digits"], False),
    ("a/b", [], False),
])
def test_matches_any(topic: str, filters: list[str], expected: bool):
    assert matches_any(topic, filters) is expected


@pytest.mark.parametrize("topic_filter", ["#", "+", "a/+/c", "a/b/#", "+/+/#", "a//b", "$share/g1/a/+/c",
                                          "$share/g1/#", "$shared/x", "$SHARE/x"])
def test_valid_filters(topic_filter: str):
    assert filter_problem(topic_filter) is None
    assert check_filter(topic_filter) == topic_filter


@pytest.mark.parametrize(("topic_filter", "why"), [
    ("", "is empty"),
    ("a/#/c", "not a whole level"),
    ("a/b#", "not a whole level"),
    ("a/b+/c", "not a whole level"),
    ("a/\x00", "control character"),
    ("a" * 65_536, "longer than 65,535 bytes"),
    ("$share/g1", "no filter after its group"),
    ("$share//a", "no group name"),
    ("$share/g#/a", "wildcard"),
    ("$share/g1/a/#/b", "not a whole level"),
])
def test_invalid_filters(topic_filter: str, why: str):
    assert why in (filter_problem(topic_filter) or "")
    with pytest.raises(ValueError, match="is not a valid MQTT topic filter"):
        check_filter(topic_filter)


@pytest.mark.parametrize(("topic", "why"), [
    ("results/dev7/digits", None),
    ("", "is empty"),
    ("results/+/digits", "wildcard"),
    ("results/#", "wildcard"),
    ("results/\x7f", "control character"),
])
def test_topic_problem(topic: str, why: str | None):
    problem = topic_problem(topic)
    assert problem is None if why is None else why in (problem or "")


def test_errors_topic():
    topic = ERRORS_TOPIC.format(function="digits")
    assert topic == "edgefn/errors/digits"
    assert is_errors_topic(topic) and not is_errors_topic("results/edgefn/errors/digits")
    assert matches_any(topic, [ERRORS_FILTER])


@pytest.mark.parametrize(("a", "b", "expected"), [
    ("#", "results/+/digits", True),
    ("sensors/+/digits", "results/+/digits", False),
    ("results/+/digits", "results/dev1/+", True),
    ("results/#", "results", True),  # '#' also matches the parent level
    ("a/b", "a/b/c", False),
    ("a/+", "a/b/#", True),
    ("a/+/c", "a/b/d", False),
    ("edgefn/errors/#", "edgefn/errors/digits", True),
])
def test_filters_overlap(a: str, b: str, expected: bool):
    assert filters_overlap(a, b) is expected and filters_overlap(b, a) is expected


def test_a_shared_subscription_matches_by_its_filter():
    assert match_filter("$share/g1/sensors/+/digits") == "sensors/+/digits"
    assert match_filter("sensors/+/digits") == "sensors/+/digits"
    assert example_topic("$share/g1/sensors/+/digits") == "sensors/dev1/digits"
