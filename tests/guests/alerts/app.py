"""Publishes as its payload asks, to test delivery options and the manifest's bounds on them.

    alert:TEXT  a retained "last alert" on alerts/<device>/last, with a user property severity=high
    fast        a QoS 0 message on results/<device>/alerts
    plain       Message(topic, payload), as functions written before the options: QoS1, not retained
    crowded     three user properties (the manifest allows two)
    heavy       a user property of 100 bytes (the manifest allows 64 in all)
    reserved    a user property named edgefn-event (the daemon's)
    qos2        QoS 2 (not offered)
"""

from edgefn_guest import Function
from wit_world.imports.types import Message

_ASKED = {
    "fast": {"qos": 0},
    "crowded": {"properties": [("a", "1"), ("b", "2"), ("c", "3")]},
    "heavy": {"properties": {"note": "x" * 96}},
    "reserved": {"properties": {"edgefn-event": "forged"}},
    "qos2": {"qos": 2},
}


class WitWorld(Function):
    def handle(self, event):
        device = event.topic.split("/")[1]
        body = bytes(event.payload).decode()
        if body.startswith("alert:"):
            return [Message(f"alerts/{device}/last", body[6:].encode(), retain=True,
                            properties={"severity": "high"})]
        if body == "plain":
            return [Message(f"results/{device}/alerts", b"plain")]
        return [Message(f"results/{device}/alerts", body.encode(), **_ASKED[body])]
