"""The baseline of bench/e2e.py: the digits classifier a user would write by hand instead of edgefn.

paho-mqtt 2 with default settings; subscribes `sensors/+/digits` at QoS1; for each message parses
the JSON, runs the digits model on onnxruntime (CPU, one thread) and publishes
`results/<device>/digits` {"event_id", "label", "score"} at QoS1. Stops on SIGTERM or Ctrl-C.

    python bench/plain_digits.py [mqtt://127.0.0.1:1883] [models/digits/model.onnx]
"""

import json
import signal
import sys
from urllib.parse import urlsplit

import numpy as np
import onnxruntime as ort
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

url = urlsplit(sys.argv[1] if len(sys.argv) > 1 else "mqtt://127.0.0.1:1883")
options = ort.SessionOptions()
options.intra_op_num_threads = 1
session = ort.InferenceSession(sys.argv[2] if len(sys.argv) > 2 else "models/digits/model.onnx",
                               options, providers=["CPUExecutionProvider"])
input_name = session.get_inputs()[0].name


def on_connect(client, userdata, flags, reason_code, properties):
    client.subscribe("sensors/+/digits", qos=1)


def on_message(client, userdata, msg):
    try:
        doc = json.loads(msg.payload)
        pixels = np.asarray(doc["pixels"], dtype=np.float32).reshape(1, 64)
    except (ValueError, KeyError, TypeError) as exc:
        print(f"skipping a bad payload on {msg.topic}: {exc}", file=sys.stderr)
        return
    labels, probabilities = session.run(None, {input_name: pixels})
    label = int(labels[0])
    out = {"event_id": doc.get("id"), "label": label, "score": round(float(probabilities[0][label]), 6)}
    client.publish(f"results/{msg.topic.split('/')[1]}/digits", json.dumps(out), qos=1)


client = mqtt.Client(CallbackAPIVersion.VERSION2)
client.on_connect = on_connect
client.on_message = on_message
client.connect(url.hostname or "127.0.0.1", url.port or 1883)
signal.signal(signal.SIGTERM, lambda *_: client.disconnect())
try:
    client.loop_forever()
except KeyboardInterrupt:
    client.disconnect()
