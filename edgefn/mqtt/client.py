"""paho's client, able to stop reading from its socket for a while: TCP's own backpressure.

Ingress holds, unacknowledged, what arrives past the inbox's bound; past a bound in bytes on those
it asks the connection to stop reading. The broker then keeps the rest (its socket to us fills and
it queues), and memory stays bounded whatever the payloads weigh. Writing goes on meanwhile
(results still leave, and our PINGREQs keep the broker's keepalive happy); the bytes that wait in
the socket show the broker is there, which paho's own keepalive check is told, since it cannot read
the PINGRESP while paused.

It leans on paho-mqtt 2's `loop_read` and its keepalive clock `_last_bytes_received` (pinned below 3
in pyproject.toml; tests/test_connection.py pauses a real connection longer than its keepalive).
"""

from __future__ import annotations

import time

import paho.mqtt.client as mqtt

_PAUSED_WAIT_S = 0.005  # the socket stays readable while paused: wait this long per loop instead of spinning


class PausableClient(mqtt.Client):
    """An `mqtt.Client` whose network loop skips reading while `paused` is set."""

    paused = False

    def loop_read(self, max_packets: int = 1) -> mqtt.MQTTErrorCode:
        if not self.paused:
            return super().loop_read(max_packets)
        with self._msgtime_mutex:  # bytes are waiting to be read: the broker is alive
            self._last_bytes_received = mqtt.time_func()
        time.sleep(_PAUSED_WAIT_S)
        return mqtt.MQTTErrorCode.MQTT_ERR_SUCCESS
