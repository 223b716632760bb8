"""The device agent: learns what the fleet wants this device to run, installs it, checks it, reports.

One thread beside the daemon. Every `fleet_poll_s` it asks the fleet server for the device's
desired release (`GET .../desired` with If-None-Match: an unchanged answer costs a 304) and reports
its state and health (`POST .../report`). When the desired release is not the one running, it walks
the update's steps (docs/fleet.md, "Device agent"), writing `update.json` before each, so that a
SIGKILL at any step leaves the old release or the new one running, never a mix:

    downloading  python-tuf refreshes the metadata and downloads the bundle, verified
    verifying    the bundle is the release asked for, and not older than the one running
    compiling    unpacked to bundles/<sha256>/ (whole or absent), components compiled into the cache
    activating   active.json names the new release; the daemon swaps it in while events flow
    checking     the bundle's health check through the new functions, then the soak against the gate
    reporting    active, or rolled back (active.json names the old release again) with the reason

EDGEFN_FLEET_KILL_AT=<step> makes the agent SIGKILL its own process right after it writes
update.json for that step: a test hook for the kill-at-every-step tests, never set in the field.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

import httpx

from edgefn import __version__
from edgefn.errors import BundleError, EdgefnError, FleetError, UpdateRefused
from edgefn.fleet.bundle import file_sha256
from edgefn.fleet.device import Device
from edgefn.fleet.fetch import ReleaseFetcher, check_not_older
from edgefn.fleet.health import check_health, load_health
from edgefn.fleet.store import Active, Release, refusal_key
from edgefn.fleet.unpack import read_bundle, read_unpacked, unpack
from edgefn.functions.build import discover, runnable_component
from edgefn.functions.manifest import load_manifest
from edgefn.protocol.fleet import API, Desired, DeviceReport, DeviceState, GateRule, Health, target_name

log = logging.getLogger("edgefn.fleet")
KILL_AT = "EDGEFN_FLEET_KILL_AT"
_HEARTBEAT_S = 30.0  # an unchanged state is reported at least this often (the fleet page's "last seen")
_SOAK_TICK_S = 0.25


class _Interrupted(Exception):
    """The agent stops mid-check: update.json stays, and the check runs again after the restart."""


class FleetAgent:
    """Keeps a device on the release the fleet server wants for it."""

    def __init__(self, daemon: Device):
        s = daemon.settings
        if not s.fleet_url:
            raise FleetError("the fleet agent needs a fleet server (--fleet URL)")
        self.daemon, self.store = daemon, daemon.fleet
        self.url = s.fleet_url.rstrip("/")
        self.device_id = s.device_id
        self.group, self.poll_s = s.group, s.fleet_poll_s
        self.fetcher = ReleaseFetcher(self.store.dir, self.url, s.fleet_root)
        self._http = httpx.Client(base_url=f"{self.url}{API}", timeout=10.0)
        self._etag: str | None = None
        self._polled_at = 0.0
        self._desired: Desired | None = None
        self._state: DeviceState = "active" if daemon.release else "idle"
        self._detail = ""
        if daemon.fleet_problem:  # the release named by active.json did not start: the daemon went back
            self._state, self._detail = "rolled-back", daemon.fleet_problem
        self._rollout: int | None = self.store.active().rollout
        self._target: str | None = None
        self._last_report: tuple | None = None
        self._last_report_at = 0.0
        self._outage = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="edgefn-fleet", daemon=True)

    # -- lifecycle -----------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        self._http.close()

    def _run(self) -> None:
        backoff = self.poll_s
        while not self._stop.is_set():
            try:
                self._tick()
                if self._outage:
                    log.info("fleet server %s answers again", self.url)
                self._outage, backoff = False, self.poll_s
            except FleetError as exc:
                if not self._outage:  # once per outage, not once per poll
                    log.warning("fleet server: %s (the active release keeps running; retrying)", exc)
                self._outage, backoff = True, min(backoff * 2, 60.0)
            except Exception:  # a bug of ours must not stop the agent, nor the daemon
                log.exception("fleet agent step failed; retrying")
                backoff = min(backoff * 2, 60.0)
            self._stop.wait(backoff)

    def _tick(self) -> None:
        self._resume()  # an update cut short (by a restart, or a failure of ours) is finished first
        desired = self._poll()
        self._report()
        if desired is not None:
            self._follow(desired)

    # -- talking to the server -------------------------------------------------------------------------
    def _poll(self) -> Desired | None:
        headers = {"If-None-Match": self._etag} if self._etag else {}
        response = self._call("GET", f"/devices/{self.device_id}/desired", headers=headers)
        self._polled_at = time.monotonic()
        if response.status_code == 304 and self._desired is not None:
            return self._desired
        if response.status_code == 404:  # not registered yet: the first report does it
            return None
        self._desired = Desired.model_validate_json(response.content)
        self._etag = response.headers.get("ETag")
        return self._desired

    def _report(self, force: bool = False) -> None:
        since = time.monotonic() - self._last_report_at
        if not force and since < self.poll_s / 2:
            return  # at most one report a poll interval
        current = self.daemon.release
        health = self.daemon.health_window()
        report = DeviceReport(group=self.group, state=self._state, bundle=current.bundle if current else None,
                              version=current.version if current else None, rollout=self._rollout,
                              target_version=self._target, detail=self._detail, health=health,
                              agent=f"edgefn {__version__}")
        key = (report.state, report.bundle, report.version, report.rollout, report.detail, health.events)
        if not force and key == self._last_report and since < _HEARTBEAT_S:
            return  # an unchanged report only as a heartbeat
        self._call("POST", f"/devices/{self.device_id}/report", content=report.model_dump_json(),
                   headers={"Content-Type": "application/json"})
        self._last_report, self._last_report_at = key, time.monotonic()

    def _call(self, method: str, path: str, **kwargs: object) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise FleetError(f"{self.url} cannot be reached: {exc}") from None
        if response.status_code >= 400 and response.status_code != 404:
            raise FleetError(f"{method} {path}: HTTP {response.status_code}: {response.text[:200]}",
                             status=response.status_code)
        return response

    def _set(self, state: DeviceState, detail: str = "") -> None:
        """The state the next report says; reported now (a failed report is retried by the next poll)."""
        self._state, self._detail = state, detail
        try:
            self._report(force=True)
        except FleetError as exc:
            log.info("fleet report deferred: %s", exc)

    # -- deciding -------------------------------------------------------------------------------------
    def _follow(self, desired: Desired) -> None:
        active = self.store.active()
        current = active.current
        if desired.bundle is None or desired.version is None:
            # A halted rollout sends its devices back to what they ran before; before it they ran
            # their own --functions, so the fleet names no release.
            if current is not None and desired.rollout is not None and desired.rollout == active.rollout:
                self._switch_back(active, f"rollout {desired.rollout} was rolled back by the fleet server")
            return
        if current is not None and current.same(desired.bundle, desired.version):
            return
        if refusal_key(desired.rollout, desired.bundle, desired.version) in active.refused:
            return  # rolled back or refused here already: not again for this rollout
        fleet_rollback = active.previous is not None and active.previous.same(desired.bundle, desired.version)
        release = Release(bundle=desired.bundle, version=desired.version,
                          target=desired.target or target_name(desired.bundle, desired.version))
        self._update(release, desired, fleet_rollback)

    def _switch_back(self, active: Active, why: str) -> None:
        """The fleet wants the previous release again (a rollout halted after this device updated)."""
        log.warning("%s: going back to %s", why, active.previous.label if active.previous else "the local functions")
        try:
            # Swapped first, recorded after: a crash in between restarts on the withdrawn release, and
            # the fleet's desired state sends the device back again.
            self.daemon.activate(active.previous)
        except Exception as exc:  # noqa: BLE001 - whatever stops it, the running release stays
            log.exception("going back failed")
            self._set("failed", f"could not go back to the previous release: {exc}")
            return
        self.store.set_active(Active(current=active.previous, previous=active.current, rollout=None,
                                     refused=active.refused))
        self._rollout, self._target = None, None
        self._set("rolled-back", why)

    # -- the update -----------------------------------------------------------------------------------
    def _step(self, release: Release, step: str, desired: Desired, fleet_rollback: bool) -> None:
        self.store.set_update(release, step, desired.rollout, desired.gate, desired.soak_s, fleet_rollback)
        if os.environ.get(KILL_AT) == step:
            log.warning("%s=%s: killing this process (test hook)", KILL_AT, step)
            os.kill(os.getpid(), signal.SIGKILL)
        if step != "reporting":  # the report itself says active or rolled-back
            self._set(step)  # type: ignore[arg-type]

    def _update(self, release: Release, desired: Desired, fleet_rollback: bool) -> None:
        self._rollout, self._target = desired.rollout, release.version
        log.info("updating to %s (rollout %s)", release.label, desired.rollout)
        try:
            self._step(release, "downloading", desired, fleet_rollback)
            path = self.fetcher.fetch(release.target)  # the server away: FleetError, tried again next poll
        except UpdateRefused as exc:
            self._refuse(release, desired, str(exc))
            return
        try:
            self._step(release, "verifying", desired, fleet_rollback)
            manifest = read_bundle(path)
            if (manifest.name, manifest.version) != (release.bundle, release.version):
                raise UpdateRefused(f"{release.target} holds {manifest.name}@{manifest.version}, "
                                    f"not {release.label}")
            current = self.daemon.release
            if not fleet_rollback and current is not None and current.bundle == release.bundle:
                check_not_older(current.version, release.version)
            release = release.model_copy(update={"sha256": file_sha256(path)})
            self._step(release, "compiling", desired, fleet_rollback)
            folder = self.store.bundle_dir(release)
            unpack(path, folder)
            for fn_dir in discover([folder / "functions"]):
                self.daemon.precompile(runnable_component(fn_dir, load_manifest(fn_dir)))
        except EdgefnError as exc:  # not the release asked for, older, a bad bundle or component: not again
            self._refuse(release, desired, str(exc))
            return
        if not self._still_wanted(release):
            self.store.end_update()
            return
        self._step(release, "activating", desired, fleet_rollback)
        active = self.store.active()
        self.store.set_active(Active(current=release, previous=active.current, rollout=desired.rollout,
                                     refused=active.refused))
        try:
            self.daemon.activate(release)
        except Exception as exc:  # noqa: BLE001 - whatever stops the new release from loading, the old one stays
            self._roll_back(release, desired.rollout, f"the new release does not start: {exc}", fleet_rollback)
            return
        self._check(release, desired, fleet_rollback)

    def _still_wanted(self, release: Release) -> bool:
        """Whether the fleet still names `release` for this device (a rollout may have halted meanwhile);
        with the server away, the update goes on. Asks the server at most once a poll interval."""
        desired = self._desired
        if time.monotonic() - self._polled_at >= self.poll_s:
            try:
                desired = self._poll()
            except FleetError:
                return True
        if desired is None or release.same(desired.bundle, desired.version):
            return True
        log.info("the fleet no longer wants %s for this device", release.label)
        return False

    def _check(self, release: Release, desired: Desired, fleet_rollback: bool) -> None:
        """Health check, then soak against the gate; rolls back when either fails. Stopping mid-check
        leaves update.json at `checking`: the check runs again after the restart."""
        self._step(release, "checking", desired, fleet_rollback)
        problems = self._health_check(release)
        if problems:
            self._roll_back(release, desired.rollout, "health check failed: " + "; ".join(problems[:3]),
                            fleet_rollback)
            return
        try:
            broken = self._soak(release, desired.gate, desired.soak_s)
        except _Interrupted:
            return
        if broken:
            self._roll_back(release, desired.rollout, f"gate broken here: {broken}", fleet_rollback)
            return
        self._step(release, "reporting", desired, fleet_rollback)
        self._set("active")
        self.store.end_update()
        log.info("%s is active", release.label)

    def _health_check(self, release: Release) -> list[str]:
        folder = self.store.bundle_dir(release)
        manifest = read_unpacked(folder)
        if manifest.health is None:
            return []
        try:
            check = load_health(folder / manifest.health)
        except BundleError as exc:
            return [str(exc)]
        return check_health(check.samples, self.daemon.run_sample)

    def _soak(self, release: Release, gate: list[GateRule], soak_s: float) -> str | None:
        """Watch the new release's own error rate and p99 for `soak_s`: the first rule broken, or None.
        _Interrupted when the agent stops, or when the fleet stops wanting the release meanwhile (the
        update then ends here and the next poll follows the fleet)."""
        until = time.monotonic() + soak_s
        while time.monotonic() < until:
            if self._stop.is_set():
                raise _Interrupted
            broken = gate_broken(gate, self.daemon.health_window())
            if broken:
                return broken
            try:
                self._report()
            except FleetError:
                pass  # the soak goes on without the server
            if not self._still_wanted(release):
                self.store.end_update()
                raise _Interrupted
            self._stop.wait(min(_SOAK_TICK_S, max(0.0, until - time.monotonic())))
        return gate_broken(gate, self.daemon.health_window())

    def _roll_back(self, release: Release, rollout: int | None, why: str, fleet_rollback: bool) -> None:
        """Back to the release that ran before; when `release` was itself the fleet sending this device back
        (a halted rollout), not to the withdrawn one but to the local functions."""
        log.error("rolling back %s: %s", release.label, why)
        active = self.store.active()
        if active.current is not None and active.current.same(release.bundle, release.version):
            back = None if fleet_rollback else active.previous
        else:
            back = active.current  # activation never recorded: what runs stays
        self.store.set_active(active.refusing(release, rollout, run=back))
        try:
            self.daemon.activate(back)
        except Exception as exc:  # noqa: BLE001 - the next start falls back further (Daemon.start)
            log.exception("rolling back failed")
            why += f"; rolling back failed too: {exc}"
        self._set("rolled-back", why)
        self.store.end_update()

    def _refuse(self, release: Release, desired: Desired, why: str) -> None:
        log.error("refused %s: %s", release.label, why)
        active = self.store.active()
        key = refusal_key(desired.rollout, release.bundle, release.version)
        self.store.set_active(active.model_copy(update={"refused": [*active.refused, key]}))
        self._set("failed", why)
        self.store.end_update()

    def _resume(self) -> None:
        """After a restart mid-update: the new release already runs (activation was done) -> check it
        again; it does not -> forget the attempt, the next poll starts it over (downloads are kept)."""
        update = self.store.update()
        if update is None:
            return
        current = self.daemon.release
        if current is not None and current.same(update.release.bundle, update.release.version):
            log.info("resuming the update to %s at checking", update.release.label)
            self._rollout, self._target = update.rollout, update.release.version
            desired = Desired(device_id=self.device_id, bundle=update.release.bundle, version=update.release.version,
                              target=update.release.target, rollout=update.rollout, gate=update.gate,
                              soak_s=update.soak_s)
            self._check(current, desired, update.fleet_rollback)
        else:
            log.info("the update to %s was interrupted at %s: starting it over", update.release.label, update.step)
            self.store.end_update()


def gate_broken(gate: list[GateRule], health: Health) -> str | None:
    """The first of a gate's rules that a device's own health breaks, in words (install failures are
    the server's to count)."""
    values = {"error_rate": health.error_rate, "p99_ms": health.p99_ms}
    for rule in gate:
        if rule.metric in values and not rule.passes(values[rule.metric]):
            return f"{rule} (measured {values[rule.metric]:.4g})"
    return None
