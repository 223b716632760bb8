"""The offload policy: when a function's inference may be handed to the cloud endpoint.

Spelled once, here, for everything that reads or checks it: a function's manifest (`offload = ...`,
shipped inside bundles), `edgefn run --offload` and its settings, and the planner that acts on it
(`edgefn.offload.planner`, where each value's meaning is described). This module imports nothing, so
the manifest and the settings can use it without loading the offload client.
"""

from __future__ import annotations

from typing import Literal, get_args

Policy = Literal["never", "on-overload", "on-low-confidence", "always"]
POLICIES: tuple[Policy, ...] = get_args(Policy)
