"""What a broker allows the results session, as its CONNACK says (MQTT 5 properties), and what
that means for the answers that leave on it.

A broker that is sent more than it allows drops the connection: a QoS 1 PUBLISH to one whose
Maximum QoS is 0, a retained one where Retain Available is false, a packet over its Maximum Packet
Size. Egress resends after the reconnect, and the broker drops it again: a loop, once a second, with
the answers never leaving the outbox. So egress sends within these limits: at the broker's Maximum
QoS (QoS 0: an answer counts as delivered once written, and loses its at-least-once promise, which
/healthz reports), not retained where retain is not available, never more in flight than its
Receive Maximum, and never a packet larger than it takes (refused instead, as a broker's refusal
is: logged, counted in edgefn_messages_refused_total, kept in the outbox). A property the CONNACK
leaves out means MQTT 5's default: no limit. Each limit that changes what is sent is logged once
(again only if a later CONNACK says otherwise).
"""

from __future__ import annotations

from dataclasses import dataclass

RECEIVE_MAXIMUM_DEFAULT = 65535  # MQTT 5: a CONNACK without Receive Maximum allows this many


@dataclass(frozen=True, slots=True)
class BrokerLimits:
    maximum_qos: int = 2
    retain_available: bool = True
    maximum_packet_size: int | None = None  # bytes of one packet, its header included; None: no limit
    receive_maximum: int = RECEIVE_MAXIMUM_DEFAULT
    topic_alias_maximum: int = 0  # egress uses no topic aliases: nothing to obey

    @classmethod
    def of(cls, connack_properties: object) -> BrokerLimits:
        """From paho's CONNACK properties (any attribute left out keeps MQTT 5's default)."""
        def given(name: str, default: object) -> object:
            return getattr(connack_properties, name, default)

        return cls(maximum_qos=int(given("MaximumQoS", 2)),  # type: ignore[call-overload]
                   retain_available=bool(given("RetainAvailable", 1)),
                   maximum_packet_size=given("MaximumPacketSize", None),  # type: ignore[arg-type]
                   receive_maximum=int(given("ReceiveMaximum", RECEIVE_MAXIMUM_DEFAULT)),  # type: ignore[call-overload]
                   topic_alias_maximum=int(given("TopicAliasMaximum", 0)))  # type: ignore[call-overload]

    @property
    def problem(self) -> str | None:
        """Why answers are less safe than they should be on this broker (None: they are not)."""
        if self.maximum_qos == 0:
            return ("the broker allows QoS 0 only (Maximum QoS 0): answers go out at QoS 0, "
                    "counted as delivered once written, and are lost if the connection drops then")
        return None

    def notes(self) -> list[str]:
        """What egress sends otherwise than asked on this broker, one line each."""
        lines = [self.problem] if self.problem else []
        if not self.retain_available:
            lines.append("the broker does not take retained messages (Retain Available 0): "
                         "retained answers go out not retained")
        return lines

    def snapshot(self) -> dict[str, int | bool | None]:
        return {"maximum_qos": self.maximum_qos, "retain_available": self.retain_available,
                "maximum_packet_size": self.maximum_packet_size, "receive_maximum": self.receive_maximum}
