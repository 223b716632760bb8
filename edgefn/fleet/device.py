"""What the fleet agent drives: the `Device` protocol the daemon (edgefn.daemon.Daemon) fulfils, and a
fake in tests can. The agent and the installation import this, never the daemon."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from edgefn.config import Settings
from edgefn.fleet.store import FleetStore, Release
from edgefn.protocol.fleet import Health


class Device(Protocol):
    """What the agent drives: the daemon (edgefn.daemon.Daemon), or a fake in tests."""

    settings: Settings
    fleet: FleetStore  # update.json, active.json and the unpacked bundles
    fleet_problem: str | None  # why the release active.json named did not start (the device went back)

    @property
    def release(self) -> Release | None:
        """The fleet release running now (None: the local functions)."""

    def activate(self, release: Release | None) -> None:
        """Run `release` instead of what runs now, while events flow; raises if it does not load."""

    def precompile(self, wasm: Path) -> None:
        """Compile a component for this device into its cache, so activating it costs no compile."""

    def run_sample(self, topic: str, payload: bytes) -> list[tuple[str, bytes]]:
        """What the functions running now answer to one event, outside the journal and the broker."""

    def health_window(self) -> Health:
        """Events, errors and p99 of the functions running now, since they were activated, and the accuracy
        their health check measured."""

    def record_accuracy(self, accuracy: float | None) -> None:
        """The accuracy the health check measured of the functions running now: in their health window."""

    def usage(self) -> dict[str, dict[str, float | int]]:
        """What each function has cost since the daemon started: function -> its totals (FunctionUsage's fields)."""
