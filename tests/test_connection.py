"""The connection's own packing of MQTT 5 user properties: byte for byte what paho's Properties packs."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edgefn.mqtt.connection import POSSIBLE_DUPLICATE, UserProperties

TEXT = st.text(st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00"), max_size=300)


@given(st.lists(st.tuples(TEXT, TEXT), max_size=6))
def test_user_properties_pack_as_paho_does(pairs: list[tuple[str, str]]):
    reference = Properties(PacketTypes.PUBLISH)
    reference.UserProperty = list(pairs)
    assert UserProperties(pairs).pack() == reference.pack()


def test_marking_a_message_as_a_possible_duplicate_repacks_it_once():
    props = UserProperties([("edgefn-event", "7")])
    before = props.pack()
    props.add(POSSIBLE_DUPLICATE)
    props.add(POSSIBLE_DUPLICATE)
    reference = Properties(PacketTypes.PUBLISH)
    reference.UserProperty = [("edgefn-event", "7"), POSSIBLE_DUPLICATE]
    assert props.pack() == reference.pack() != before
