"""The MQTT 5 user properties on every output the daemon publishes: the contract with consumers.

    edgefn-event      the journal id of the event it answers (never reused on a device): drop repeats by it
    edgefn-duplicate  "possible" when the output may have reached subscribers before (replayed after a
                      restart, or resent after a reconnect)
    edgefn-function   name@version of the function that answered
    edgefn-release    bundle@version, when a fleet release runs
    edgefn-models     model=variant/format/delegate,... the models the function ran on

A function may add its own user properties (within its manifest's `[publish]` bounds); they follow
these, and no key of theirs may start with `edgefn-`.
"""

from __future__ import annotations

EVENT = "edgefn-event"
FUNCTION = "edgefn-function"
RELEASE = "edgefn-release"
MODELS = "edgefn-models"
POSSIBLE_DUPLICATE = ("edgefn-duplicate", "possible")
RESERVED_PREFIX = "edgefn-"  # keys the daemon sets: a function's own user properties may not use them
