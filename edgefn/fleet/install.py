"""One release installed on this device: the update's steps, the check and soak against the rollout's
gate, and the way back when it fails.

An `Installation` walks the steps (docs/fleet.md, "Device agent") against the `Device` protocol,
writing `update.json` before each, so that a SIGKILL at any step leaves the old release or the new one
running, never a mix:

    downloading  python-tuf refreshes the metadata and downloads the bundle, verified
    verifying    the bundle is the release asked for, and not older than the one running
    compiling    unpacked to bundles/<sha256>/ (whole or absent), components compiled into the cache
    activating   active.json names the new release; the daemon swaps it in while events flow
    checking     the bundle's health check through the new functions, then the soak against the gate
    reporting    active, or rolled back (active.json names the old release again) with the reason

The fleet agent (edgefn.fleet.agent) decides what to install and holds the conversation with the fleet
server; an installation reaches the server only through it (the `Agent` protocol below).

EDGEFN_FLEET_KILL_AT=<step> makes the agent SIGKILL its own process right after it writes
update.json for that step: a test hook for the kill-at-every-step tests, never set in the field.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Protocol

from edgefn.errors import BundleError, ClockSkew, EdgefnError, UpdateRefused
from edgefn.files import file_sha256
from edgefn.fleet.device import Device
from edgefn.fleet.fetch import ReleaseFetcher, check_not_older
from edgefn.fleet.health import load_health, run_health
from edgefn.fleet.store import Active, Release, refusal_key
from edgefn.fleet.unpack import read_bundle, read_unpacked, unpack
from edgefn.functions.build import discover, runnable_component
from edgefn.functions.manifest import load_manifest
from edgefn.protocol.fleet import Desired, DeviceState, GateRule, Health

log = logging.getLogger("edgefn.fleet")
KILL_AT = "EDGEFN_FLEET_KILL_AT"
_SOAK_TICK_S = 0.25


class _Interrupted(Exception):
    """The agent stops mid-check: update.json stays, and the check runs again after the restart."""


class Agent(Protocol):
    """What an installation needs of the agent that runs it (edgefn.fleet.agent.FleetAgent)."""

    fetcher: ReleaseFetcher  # the fleet server's TUF repository
    stopping: threading.Event  # set when the agent stops: a soak ends there, update.json kept

    def say(self, state: DeviceState, detail: str = "") -> None:
        """Report `state` to the fleet server now (a report that fails is retried by the next poll)."""

    def heartbeat(self) -> None:
        """The report of every poll interval (the health so far); never raises: the soak goes on without
        the server."""

    def still_wanted(self, release: Release) -> bool:
        """Whether the fleet still names `release` for this device (True with the server away)."""


class Installation:
    """One release on its way onto this device: `run()` walks every step, from downloading to active,
    refused or rolled back; `resumed()` picks up an update that a restart cut short."""

    def __init__(self, device: Device, agent: Agent, release: Release, desired: Desired, *,
                 fleet_rollback: bool = False):
        self.device, self.agent, self.store = device, agent, device.fleet
        self.release = release  # its sha256 is known once it is verified
        self.desired = desired  # the fleet's word: the rollout, its gate and soak time
        # The fleet sending this device back to its previous release (a halted rollout): no version check,
        # and a failure goes to the local functions rather than to the withdrawn release.
        self.fleet_rollback = fleet_rollback

    @classmethod
    def resumed(cls, device: Device, agent: Agent) -> Installation | None:
        """After a restart mid-update: the new release already runs (activation was done) -> the
        installation, to `check()` it again; it does not -> None, the attempt forgotten (the next poll
        starts it over; downloads are kept)."""
        update = device.fleet.update()
        if update is None:
            return None
        current = device.release
        if current is None or not current.same(update.release.bundle, update.release.version):
            log.info("the update to %s was interrupted at %s: starting it over", update.release.label, update.step)
            device.fleet.end_update()
            return None
        log.info("resuming the update to %s at checking", update.release.label)
        desired = Desired(device_id=device.settings.device_id, bundle=update.release.bundle,
                          version=update.release.version, target=update.release.target, rollout=update.rollout,
                          gate=update.gate, soak_s=update.soak_s)
        return cls(device, agent, current, desired, fleet_rollback=update.fleet_rollback)

    # -- the steps ------------------------------------------------------------------------------------
    def run(self) -> None:
        log.info("updating to %s (rollout %s)", self.release.label, self.desired.rollout)
        path = self._download()
        if path is None or not self._prepare(path):
            return
        if not self.agent.still_wanted(self.release):
            self.store.end_update()
            return
        if self._activate():
            self.check()

    def _step(self, step: str) -> None:
        self.store.set_update(self.release, step, self.desired.rollout, self.desired.gate, self.desired.soak_s,
                              self.fleet_rollback)
        if os.environ.get(KILL_AT) == step:
            log.warning("%s=%s: killing this process (test hook)", KILL_AT, step)
            os.kill(os.getpid(), signal.SIGKILL)
        if step != "reporting":  # the report itself says active or rolled-back
            self.agent.say(step)  # type: ignore[arg-type]

    def _download(self) -> Path | None:
        """The bundle file, or None when it is refused; the server away raises FleetError (tried again
        next poll)."""
        try:
            self._step("downloading")
            return self.agent.fetcher.fetch(self.release.target)
        except ClockSkew as exc:  # the device's problem: not a refusal, tried again at the next poll
            log.warning("not updating to %s: %s", self.release.label, exc)
            self.agent.say("clock-skew", str(exc))
            self.store.end_update()
            return None
        except UpdateRefused as exc:
            self._refuse(str(exc))
            return None

    def _prepare(self, path: Path) -> bool:
        """Verifying and compiling: False when the release is refused."""
        release = self.release
        try:
            self._step("verifying")
            manifest = read_bundle(path)
            if (manifest.name, manifest.version) != (release.bundle, release.version):
                raise UpdateRefused(f"{release.target} holds {manifest.name}@{manifest.version}, "
                                    f"not {release.label}")
            current = self.device.release
            if not self.fleet_rollback and current is not None and current.bundle == release.bundle:
                check_not_older(current.version, release.version)
            self.release = release = release.model_copy(update={"sha256": file_sha256(path)})
            self._step("compiling")
            folder = self.store.bundle_dir(release)
            unpack(path, folder)
            for fn_dir in discover([folder / "functions"]):
                self.device.precompile(runnable_component(fn_dir, load_manifest(fn_dir)))
        except EdgefnError as exc:  # not the release asked for, older, a bad bundle or component: not again
            self._refuse(str(exc))
            return False
        return True

    def _activate(self) -> bool:
        """active.json names the new release, then the daemon swaps it in: False when it was rolled back."""
        self._step("activating")
        active = self.store.active()
        self.store.set_active(Active(current=self.release, previous=active.current, rollout=self.desired.rollout,
                                     refused=active.refused))
        try:
            self.device.activate(self.release)
        except Exception as exc:  # noqa: BLE001 - whatever stops the new release from loading, the old one stays
            self._roll_back(f"the new release does not start: {exc}")
            return False
        self.store.audit.append("activated", **self._audited(), previous=active.current and active.current.label)
        return True

    def _audited(self) -> dict[str, object]:
        """What every audit entry of this installation says of its release."""
        return {"bundle": self.release.bundle, "version": self.release.version, "rollout": self.desired.rollout,
                "sha256": self.release.sha256 or None}

    # -- checking -------------------------------------------------------------------------------------
    def check(self) -> None:
        """Health check, then soak against the gate; rolls back when either fails. Stopping mid-check
        leaves update.json at `checking`: the check runs again after the restart."""
        self._step("checking")
        problems = self._health_check()
        if problems:
            self._roll_back("health check failed: " + "; ".join(problems[:3]))
            return
        try:
            broken = self._soak()
        except _Interrupted:
            return
        if broken:
            self._roll_back(f"gate broken here: {broken}")
            return
        self._step("reporting")
        self.agent.say("active")
        self.store.end_update()
        log.info("%s is active", self.release.label)

    def _health_check(self) -> list[str]:
        folder = self.store.bundle_dir(self.release)
        manifest = read_unpacked(folder)
        gated = any(rule.metric == "accuracy" for rule in self.desired.gate)
        if manifest.health is None:
            return ["the rollout's gate holds accuracy, and the bundle has no health check"] if gated else []
        try:
            check = load_health(folder / manifest.health)
        except BundleError as exc:
            return [str(exc)]
        result = run_health(check, self.device.run_sample)
        self.device.record_accuracy(result.accuracy)
        if result.accuracy is None and gated:  # nothing measured would pass the gate unseen
            result.failures.append("the rollout's gate holds accuracy, and the health check has no labelled sample")
        if result.accuracy is not None:
            log.info("%s: %d of %d labelled samples right here (accuracy %.3f)", self.release.label, result.right,
                     result.labelled, result.accuracy)
        return result.failures

    def _soak(self) -> str | None:
        """Watch the new release's own error rate and p99 for the soak time: the first rule broken, or None.
        _Interrupted when the agent stops, or when the fleet stops wanting the release meanwhile (the
        update then ends here and the next poll follows the fleet)."""
        gate = self.desired.gate
        until = time.monotonic() + self.desired.soak_s
        while time.monotonic() < until:
            if self.agent.stopping.is_set():
                raise _Interrupted
            broken = gate_broken(gate, self.device.health_window())
            if broken:
                return broken
            self.agent.heartbeat()
            if not self.agent.still_wanted(self.release):
                self.store.end_update()
                raise _Interrupted
            self.agent.stopping.wait(min(_SOAK_TICK_S, max(0.0, until - time.monotonic())))
        return gate_broken(gate, self.device.health_window())

    # -- the way back ---------------------------------------------------------------------------------
    def _roll_back(self, why: str) -> None:
        """Back to the release that ran before; when this installation was itself the fleet sending this
        device back (a halted rollout), not to the withdrawn one but to the local functions."""
        release = self.release
        log.error("rolling back %s: %s", release.label, why)
        active = self.store.active()
        if active.current is not None and active.current.same(release.bundle, release.version):
            back = None if self.fleet_rollback else active.previous
        else:
            back = active.current  # activation never recorded: what runs stays
        self.store.set_active(active.refusing(release, self.desired.rollout, run=back))
        try:
            self.device.activate(back)
        except Exception as exc:  # noqa: BLE001 - the next start falls back further (Daemon.start)
            log.exception("rolling back failed")
            why += f"; rolling back failed too: {exc}"
        self.store.audit.append("rolled-back", **self._audited(), by="device", reason=why,
                                to=back.label if back else "local functions")
        self.agent.say("rolled-back", why)
        self.store.end_update()

    def _refuse(self, why: str) -> None:
        log.error("refused %s: %s", self.release.label, why)
        active = self.store.active()
        key = refusal_key(self.desired.rollout, self.release.bundle, self.release.version)
        self.store.set_active(active.model_copy(update={"refused": [*active.refused, key]}))
        self.store.audit.append("refused", **self._audited(), reason=why)
        self.agent.say("failed", why)
        self.store.end_update()


def gate_broken(gate: list[GateRule], health: Health) -> str | None:
    """The first of a gate's rules that a device's own health breaks, in words (install failures are
    the server's to count)."""
    values = {"error_rate": health.error_rate, "p99_ms": health.p99_ms, "accuracy": health.accuracy}
    for rule in gate:
        if rule.metric in values and not rule.passes(values[rule.metric]):
            return f"{rule} (measured {values[rule.metric]:.4g})"
    return None
