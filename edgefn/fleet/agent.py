"""The device agent: the device's conversation with the fleet server, and what it decides from it.

One thread beside the daemon. Every `fleet_poll_s` it asks the fleet server for the device's
desired release (`GET .../desired` with If-None-Match: an unchanged answer costs a 304) and reports
its state and health (`POST .../report`). When the desired release is not the one running, an
`Installation` (edgefn.fleet.install) walks the update's steps, checks the release and rolls it back
where it fails, telling the server how it goes through the agent. When a halted rollout sends the
device back to what it ran before, the agent swaps it back itself.
"""

from __future__ import annotations

import logging
import re
import threading
import time

import httpx

from edgefn import __version__
from edgefn.config import redact_url
from edgefn.errors import FleetError
from edgefn.fleet.device import Device
from edgefn.fleet.fetch import ReleaseFetcher
from edgefn.fleet.install import Installation
from edgefn.fleet.store import Active, Release, refusal_key
from edgefn.protocol.fleet import (
    API,
    MAX_FUNCTIONS,
    NAME,
    Desired,
    DeviceReport,
    DeviceState,
    FunctionUsage,
    target_name,
)

log = logging.getLogger("edgefn.fleet")
_HEARTBEAT_S = 30.0  # an unchanged state is reported at least this often (the fleet page's "last seen")


class FleetAgent:
    """Keeps a device on the release the fleet server wants for it."""

    def __init__(self, daemon: Device):
        s = daemon.settings
        if not s.fleet_url:
            raise FleetError("the fleet agent needs a fleet server (--fleet URL)")
        self.daemon, self.store = daemon, daemon.fleet
        url = s.fleet_url.rstrip("/")
        self.url = redact_url(url)  # what logs and errors say
        self.device_id = s.device_id
        self.group, self.poll_s = s.group, s.fleet_poll_s
        self.fetcher = ReleaseFetcher(self.store.dir, url, s.fleet_root)
        token = s.fleet_credential()  # sent on the device's own routes only; a closed server refuses it without
        self._http = httpx.Client(base_url=f"{url}{API}", timeout=10.0,
                                  headers={"Authorization": f"Bearer {token}"} if token else {})
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
        self.stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="edgefn-fleet", daemon=True)

    # -- lifecycle -----------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.stopping.set()
        self._thread.join(timeout=30)
        self._http.close()

    def _run(self) -> None:
        backoff = self.poll_s
        while not self.stopping.is_set():
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
            self.stopping.wait(backoff)

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
                              agent=f"edgefn {__version__}", usage=self._usage())
        key = (report.state, report.bundle, report.version, report.rollout, report.detail, health.events)
        if not force and key == self._last_report and since < _HEARTBEAT_S:
            return  # an unchanged report only as a heartbeat
        self._call("POST", f"/devices/{self.device_id}/report", content=report.model_dump_json(),
                   headers={"Content-Type": "application/json"})
        self._last_report, self._last_report_at = key, time.monotonic()

    def _usage(self) -> dict[str, FunctionUsage]:
        """The functions' usage for the report (the protocol's bound: the busiest functions first)."""
        usage = {name: u for name, u in self.daemon.usage().items() if re.match(NAME, name)}
        busiest = sorted(usage, key=lambda name: -usage[name].get("invocations", 0))[:MAX_FUNCTIONS]
        return {name: FunctionUsage.model_validate(usage[name]) for name in busiest}

    def _call(self, method: str, path: str, **kwargs: object) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise FleetError(f"{self.url} cannot be reached: {exc}") from None
        if response.status_code in (401, 403):
            raise FleetError(f"the fleet server refuses this device's credential (HTTP {response.status_code}): "
                             f"enroll it (edgefn fleet devices enroll {self.device_id} --group {self.group}) and "
                             "give its token (--device-token-file or EDGEFN_DEVICE_TOKEN)",
                             status=response.status_code)
        if response.status_code >= 400 and response.status_code != 404:
            raise FleetError(f"{method} {path}: HTTP {response.status_code}: {response.text[:200]}",
                             status=response.status_code)
        return response

    # -- what an installation asks of the agent (edgefn.fleet.install.Agent) ---------------------------
    def say(self, state: DeviceState, detail: str = "") -> None:
        """The state the next report says; reported now (a failed report is retried by the next poll)."""
        self._state, self._detail = state, detail
        try:
            self._report(force=True)
        except FleetError as exc:
            log.info("fleet report deferred: %s", exc)

    def heartbeat(self) -> None:
        """The report of every poll interval, while an installation soaks."""
        try:
            self._report()
        except FleetError:
            pass  # the soak goes on without the server

    def still_wanted(self, release: Release) -> bool:
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
        self._rollout, self._target = desired.rollout, release.version
        Installation(self.daemon, self, release, desired, fleet_rollback=fleet_rollback).run()

    def _switch_back(self, active: Active, why: str) -> None:
        """The fleet wants the previous release again (a rollout halted after this device updated)."""
        log.warning("%s: going back to %s", why, active.previous.label if active.previous else "the local functions")
        try:
            # Swapped first, recorded after: a crash in between restarts on the withdrawn release, and
            # the fleet's desired state sends the device back again.
            self.daemon.activate(active.previous)
        except Exception as exc:  # noqa: BLE001 - whatever stops it, the running release stays
            log.exception("going back failed")
            self.say("failed", f"could not go back to the previous release: {exc}")
            return
        self.store.set_active(Active(current=active.previous, previous=active.current, rollout=None,
                                     refused=active.refused))
        withdrawn = active.current
        self.store.audit.append("rolled-back", by="fleet", reason=why, rollout=active.rollout,
                                bundle=withdrawn.bundle if withdrawn else None,
                                version=withdrawn.version if withdrawn else None,
                                to=active.previous.label if active.previous else "local functions")
        self._rollout, self._target = None, None
        self.say("rolled-back", why)

    def _resume(self) -> None:
        """An update cut short: checked again where the new release already runs, else forgotten."""
        installation = Installation.resumed(self.daemon, self)
        if installation is not None:
            self._rollout, self._target = installation.desired.rollout, installation.release.version
            installation.check()
