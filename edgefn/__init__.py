"""edgefn: an edge serverless runtime for IoT inference.

MQTT events trigger sandboxed WebAssembly functions that call on-device models.
"""

__version__ = "0.1.0"
