"""The MQTT 5 user properties on every output the daemon publishes: the contract with consumers.

    edgefn-event      the journal id of the event it answers (never reused on a device): drop repeats by it
    edgefn-duplicate  "possible" when the output may have reached subscribers before (replayed after a
                      restart, or resent after a reconnect)
    edgefn-function   name@version of the function that answered
    edgefn-release    bundle@version, when a fleet release runs
    edgefn-models     model=variant/format/delegate,... the models the function ran on
    edgefn-hop        how many functions the chain of events behind it went through: an event that
                      carries h (none: 0) answers with h+1; one that has gone through max_hops is not
                      run (reason `loop` on the error topic), so a function that hears its own
                      outputs, or two that answer each other, stop

A function may add its own user properties (within its manifest's `[publish]` bounds); they follow
these, and no key of theirs may start with `edgefn-`.
"""

from __future__ import annotations

from collections.abc import Iterable

EVENT = "edgefn-event"
FUNCTION = "edgefn-function"
RELEASE = "edgefn-release"
MODELS = "edgefn-models"
HOP = "edgefn-hop"
POSSIBLE_DUPLICATE = ("edgefn-duplicate", "possible")
RESERVED_PREFIX = "edgefn-"  # keys the daemon sets: a function's own user properties may not use them


def hop_of(user_properties: Iterable[tuple[str, str]] | None) -> int:
    """The hop count an incoming message carries: 0 where it has none, or one that is not a count."""
    for key, value in user_properties or ():
        if key == HOP:
            return int(value) if value.isascii() and value.isdigit() and len(value) <= 9 else 0
    return 0
