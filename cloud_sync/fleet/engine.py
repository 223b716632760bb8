"""The rollout engine: moves each running rollout through its waves, judges them and halts a bad one.

A rollout's devices are fixed when it is made: the group's devices (on a closed server, only those
enrolled and not revoked) sorted by id, the canary (the devices the operator names, else the first
`canary` of them), then `waves` (cumulative percentages of the group). On a closed server a device's
report and desired state need its own credential (cloud_sync.fleet.identity). `step(now)` looks at every running
or paused rollout (docs/fleet.md, "Fleet server"):

    pending -> installing    the wave starts: its devices are assigned the new release
    installing -> soaking    every device of the wave reports `active` on the new version
    soaking -> passed        soak_s went by with every gate rule holding; the next wave starts (unless paused)
    halt                     a device of the rollout reported failed or rolled-back, a gate rule broke while
                             soaking, or a wave was not installed within wave_timeout_s: every device of the
                             rollout is assigned its previous release again

After the last wave the group's release is the new one (`done`). A step reads the devices of a rollout in
one query and writes its waves back as one row, so it costs O(devices) and a few queries however many
devices report. The engine is also where the API changes rollouts (create, pause, resume, abort): one
lock keeps a step and those changes apart within a server, and the database keeps them apart between
servers sharing it: the rollout rows are locked (SELECT ... FOR UPDATE), and creating a rollout takes a
transaction-scoped advisory lock on its group (PostgreSQL; SQLite's write lock already covers it), so two
servers asked at once make one rollout and refuse the other.
"""

from __future__ import annotations

import copy
import logging
import math
import re
import threading
import time
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session, defer

from cloud_sync.fleet import identity
from cloud_sync.fleet.db import AssignmentRow, BundleRow, Database, DeviceRow, EnrollmentRow, GroupRow, RolloutRow
from edgefn.errors import FleetError
from edgefn.protocol.fleet import (
    MAX_COUNTER,
    Desired,
    Device,
    DeviceReport,
    GateRule,
    Health,
    Rollout,
    RolloutRequest,
    Wave,
    target_name,
)

log = logging.getLogger(__name__)

ACTIVE_ROLLOUT = ("running", "paused")
FAILED_STATES = ("failed", "rolled-back")
DEVICE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}$")


def check_device_id(device_id: str) -> str:
    if not DEVICE_ID.match(device_id):
        raise FleetError(f"device id {device_id!r}: letters, digits and . _ : @ - only, at most 128", status=400)
    return device_id


def plan_waves(device_ids: list[str], canary: int, waves: list[float],
               canary_devices: list[str] = ()) -> list[dict[str, Any]]:  # type: ignore[assignment]
    """Split the sorted devices into the canary (those named, else the first `canary`) and the cumulative
    percentage waves; empty waves are left out."""
    named = list(dict.fromkeys(canary_devices))
    ids = named + sorted(set(device_ids) - set(named))
    planned: list[dict[str, Any]] = []
    taken = len(named) if named else min(canary, len(ids))
    if taken:
        planned.append(_wave("canary", ids[:taken]))
    for percent in waves:
        upto = max(taken, min(len(ids), math.ceil(len(ids) * percent / 100 - 1e-9)))
        if upto > taken:
            number = sum(1 for w in planned if w["name"] != "canary") + 1
            planned.append(_wave(f"wave {number}", ids[taken:upto]))
            taken = upto
    return planned


def _wave(name: str, devices: list[str]) -> dict[str, Any]:
    return {"name": name, "devices": devices, "state": "pending", "healthy": 0, "gate_values": {},
            "soak_started": None, "started": None}


def gate_values(rollout: RolloutRow, devices: list[DeviceRow]) -> dict[str, float | None]:
    """The gate's metrics over a wave: error rate, p99 and accuracy (the worst device's) of the devices
    running the new release, and how many devices failed to install it."""
    running = [d for d in devices if d.bundle == rollout.bundle and d.version == rollout.version]
    events = sum(d.events for d in running)
    p99s = [d.p99_ms for d in running if d.p99_ms is not None]
    accuracies = [d.accuracy for d in running if d.accuracy is not None]
    failures = sum(1 for d in devices if d.rollout == rollout.id and d.state in FAILED_STATES)
    return {"error_rate": sum(d.errors for d in running) / events if events else None,
            "p99_ms": max(p99s) if p99s else None, "install_failures": float(failures),
            "accuracy": min(accuracies) if accuracies else None}


def to_rollout(row: RolloutRow) -> Rollout:
    return Rollout(id=row.id, bundle=row.bundle, version=row.version, group=row.group, state=row.state,  # type: ignore[arg-type]
                   waves=[Wave.model_validate(w) for w in row.waves], current_wave=row.current_wave,
                   gate=[GateRule.model_validate(g) for g in row.gate], soak_s=row.soak_s, reason=row.reason,
                   rolled_back=row.rolled_back, created=row.created, updated=row.updated)


class RolloutEngine:
    """Rollouts and the desired state of devices over one fleet database."""

    def __init__(self, db: Database, *, closed: bool = True):
        self.db = db
        self.closed = closed  # devices need their own credential; rollouts take enrolled devices only
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # Built once: a device's report is the most frequent write, and SQLAlchemy caches its compiled form.
        table = DeviceRow.__table__
        upsert = db.insert(table)
        self._upsert_device = upsert.on_conflict_do_update(
            index_elements=[table.c.id],
            set_={c.name: upsert.excluded[c.name] for c in table.columns if c.name not in ("id", "first_seen")})

    # --- the background loop --------------------------------------------------------------------------

    def start(self, every_s: float) -> None:
        """Step every `every_s` seconds in a thread until `stop()`."""
        self._thread = threading.Thread(target=self._loop, args=(every_s,), name="fleet-engine", daemon=True)
        self._thread.start()

    def _loop(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            try:
                self.step()
            except Exception:  # a failed step (the database away) is retried at the next one
                log.exception("rollout engine step failed")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    # --- devices ---------------------------------------------------------------------------------------

    def report(self, device_id: str, report: DeviceReport, now: float | None = None, *,
               token: str | None = None) -> Desired:
        """Register or update a device from its report (on a closed server, only with the device's own
        credential, in the group it was enrolled in); what it should run."""
        now = time.time() if now is None else now
        check_device_id(device_id)
        with self.db.transaction() as session:
            if self.closed:
                enrolled = identity.verify(session, device_id, token)
                if enrolled.group != report.group:
                    raise FleetError(f"device {device_id} is enrolled in group {enrolled.group!r}, not "
                                     f"{report.group!r} (enroll it again to move it)", status=403)
            values = {"id": device_id, "group_name": report.group, "state": report.state, "bundle": report.bundle,
                      "version": report.version, "rollout": report.rollout, "target_version": report.target_version,
                      "detail": report.detail, "agent": report.agent, "p99_ms": report.health.p99_ms,
                      "accuracy": report.health.accuracy,
                      "usage": {name: u.model_dump() for name, u in report.usage.items()},
                      "first_seen": now, "last_seen": now,
                      **_counters(session.get(DeviceRow, device_id), device_id, report)}
            session.execute(self._upsert_device, values)
            return self._desired(session, device_id, report.group)

    def desired(self, device_id: str, *, token: str | None = None) -> Desired:
        """What the device should run (nothing, for a device that has not reported yet)."""
        with self.db.transaction() as session:
            if self.closed:
                identity.verify(session, device_id, token)
            device = session.get(DeviceRow, device_id)
            return self._desired(session, device_id, device.group) if device else Desired(device_id=device_id)

    def enroll(self, device_id: str, group: str) -> str:
        """Enroll a device (again: a new credential); returns its token."""
        check_device_id(device_id)
        with self.db.transaction() as session:
            return identity.enroll(session, self.db.insert, device_id, group)

    def revoke(self, device_id: str) -> None:
        with self.db.transaction() as session:
            identity.revoke(session, device_id)

    def remove(self, device_id: str) -> None:
        """Forget a device: its row, its place in rollouts still to come and its credential (it must be enrolled
        again to report). A rollout's waves keep its id; a wave counts only devices that report."""
        check_device_id(device_id)
        with self.db.transaction() as session:
            found = [session.get(table, device_id) for table in (DeviceRow, AssignmentRow, EnrollmentRow)]
            if not any(found):
                raise FleetError(f"no device {device_id!r}", status=404)
            for row in found:
                if row is not None:
                    session.delete(row)

    def devices(self) -> list[Device]:
        with self.db.transaction() as session:
            rows = session.scalars(select(DeviceRow).order_by(DeviceRow.id)).all()
            assignments = {a.device_id: a for a in session.scalars(select(AssignmentRow))}
            groups = {g.name: g.rollout for g in session.scalars(select(GroupRow))}
            rollouts = {r.id: r for r in session.scalars(select(RolloutRow).where(
                RolloutRow.id.in_({a.rollout for a in assignments.values()} | set(groups.values()))))}
        return [_device(d, _wanted(d.id, d.group, assignments.get(d.id), groups, rollouts)) for d in rows]

    def _desired(self, session: Session, device_id: str, group: str) -> Desired:
        # Two small queries at most (every device reports every few seconds): the waves, the biggest column
        # of a rollout, are not read.
        assigned = session.execute(
            select(AssignmentRow, RolloutRow).join(RolloutRow, RolloutRow.id == AssignmentRow.rollout)
            .where(AssignmentRow.device_id == device_id, AssignmentRow.group == group)
            .options(defer(RolloutRow.waves))).first()
        if assigned is not None:
            return _wanted(device_id, group, assigned[0], {}, {assigned[1].id: assigned[1]})
        release = session.scalars(select(RolloutRow).join(GroupRow, GroupRow.rollout == RolloutRow.id)
                                  .where(GroupRow.name == group).options(defer(RolloutRow.waves))).first()
        return _release(device_id, release) if release is not None else Desired(device_id=device_id)

    # --- rollouts --------------------------------------------------------------------------------------

    def create(self, request: RolloutRequest, now: float | None = None) -> Rollout:
        now = time.time() if now is None else now
        with self._lock, self.db.transaction() as session:
            self.db.lock_group(session, request.group)
            bundle = session.scalars(select(BundleRow).where(BundleRow.name == request.bundle,
                                                             BundleRow.version == request.version)).first()
            if bundle is None:
                raise FleetError(f"no bundle {request.bundle} {request.version} was published "
                                 "(edgefn fleet push it first)", status=404)
            busy = session.scalars(select(RolloutRow).where(RolloutRow.group == request.group,
                                                            RolloutRow.state.in_(ACTIVE_ROLLOUT))).first()
            if busy is not None:
                raise FleetError(f"rollout {busy.id} of group {request.group!r} is {busy.state}: "
                                 "abort it first", status=409)
            ids = list(session.scalars(select(DeviceRow.id).where(DeviceRow.group == request.group)))
            if self.closed:  # a device that reported before it was revoked (or on an open server) takes no part
                ids = sorted(set(ids) & identity.enrolled_ids(session, request.group))
            if not ids:
                raise FleetError(f"group {request.group!r} has no devices (a device joins its group "
                                 "with its first report)", status=400)
            strangers = sorted(set(request.canary_devices) - set(ids))
            if strangers:
                raise FleetError(f"canary device(s) {', '.join(strangers)} are not devices of group "
                                 f"{request.group!r} (enrolled and reported)", status=400)
            waves = plan_waves(ids, request.canary, request.waves, request.canary_devices)
            row = RolloutRow(bundle=bundle.name, version=bundle.version, target=bundle.target, group=request.group,
                             state="running", waves=waves, current_wave=0,
                             gate=[g.model_dump() for g in request.gate], soak_s=request.soak_s,
                             wave_timeout_s=request.wave_timeout_s, reason="", rolled_back=False, created=now,
                             updated=now)
            session.add(row)
            session.flush()  # its id, which the assignments name
            self._advance(session, row, now)
            return to_rollout(row)

    def rollouts(self) -> list[Rollout]:
        with self.db.transaction() as session:
            return [to_rollout(r) for r in session.scalars(select(RolloutRow).order_by(RolloutRow.id))]

    def rollout(self, rollout_id: int) -> Rollout:
        with self.db.transaction() as session:
            return to_rollout(_get(session, rollout_id))

    def pause(self, rollout_id: int, now: float | None = None) -> Rollout:
        return self._change(rollout_id, "pause", now)

    def resume(self, rollout_id: int, now: float | None = None) -> Rollout:
        return self._change(rollout_id, "resume", now)

    def abort(self, rollout_id: int, now: float | None = None) -> Rollout:
        return self._change(rollout_id, "abort", now)

    def _change(self, rollout_id: int, action: str, now: float | None) -> Rollout:
        now = time.time() if now is None else now
        with self._lock, self.db.transaction() as session:
            row = _get(session, rollout_id, lock=True)
            allowed = {"pause": ("running",), "resume": ("paused",), "abort": ACTIVE_ROLLOUT}[action]
            if row.state not in allowed:
                raise FleetError(f"rollout {rollout_id} is {row.state}: it cannot {action}", status=409)
            if action == "pause":
                row.state = "paused"
            elif action == "resume":
                row.state = "running"
                waves = copy.deepcopy(row.waves)
                wave = waves[row.current_wave]
                if wave["state"] == "installing":  # the time paused does not count against the wave
                    wave["started"] = now
                row.waves = waves
                self._advance(session, row, now)
            else:
                self._halt(session, row, "aborted", now, state="aborted")
            row.updated = now
            return to_rollout(row)

    # --- the step --------------------------------------------------------------------------------------

    def step(self, now: float | None = None) -> None:
        """Move every running rollout on (and judge the current wave of a paused one)."""
        now = time.time() if now is None else now
        with self._lock, self.db.transaction() as session:
            rows = session.scalars(select(RolloutRow).where(RolloutRow.state.in_(ACTIVE_ROLLOUT))
                                   .order_by(RolloutRow.id).with_for_update()).all()
            for row in rows:
                self._advance(session, row, now)

    def _advance(self, session: Session, row: RolloutRow, now: float) -> None:
        waves = copy.deepcopy(row.waves)
        try:
            self._judge(session, row, waves, now)
        finally:
            row.waves, row.updated = waves, now

    def _judge(self, session: Session, row: RolloutRow, waves: list[dict[str, Any]], now: float) -> None:
        running = row.state == "running"
        wave = waves[row.current_wave]
        if wave["state"] == "pending":
            if not running:
                return
            self._start(session, row, wave, now)
        started = [d for w in waves[:row.current_wave + 1] for d in w["devices"]]
        devices = {d.id: d for d in session.scalars(select(DeviceRow).where(DeviceRow.id.in_(started)))}
        failed = next((devices[i] for i in started
                       if i in devices and devices[i].rollout == row.id and devices[i].state in FAILED_STATES), None)
        in_wave = [devices[i] for i in wave["devices"] if i in devices]
        wave["gate_values"] = gate_values(row, in_wave)
        wave["healthy"] = sum(1 for d in in_wave
                              if d.state == "active" and d.bundle == row.bundle and d.version == row.version)
        if failed is not None:
            why = f": {failed.detail}" if failed.detail else ""
            return self._halt(session, row, f"device {failed.id} reported {failed.state}{why}", now, waves=waves)
        if wave["state"] == "installing":
            if wave["healthy"] == len(wave["devices"]):
                wave["state"], wave["soak_started"] = "soaking", now
            elif running and now - wave["started"] > row.wave_timeout_s:
                return self._halt(session, row, f"{wave['name']} was not installed within {row.wave_timeout_s:g} s "
                                                f"({wave['healthy']} of {len(wave['devices'])} devices active)",
                                  now, waves=waves)
        if wave["state"] == "soaking":
            broken = [rule for rule in (GateRule.model_validate(g) for g in row.gate)
                      if not rule.passes(wave["gate_values"].get(rule.metric))]
            if broken:
                values = ", ".join(f"{r.metric}={wave['gate_values'][r.metric]:g} (gate {r})" for r in broken)
                return self._halt(session, row, f"gate broken in {wave['name']}: {values}", now, waves=waves)
            if now - wave["soak_started"] >= row.soak_s:
                wave["state"] = "passed"
        if wave["state"] == "passed" and running:
            if row.current_wave + 1 < len(waves):
                row.current_wave += 1
                self._start(session, row, waves[row.current_wave], now)
            else:
                self._done(session, row)

    def _start(self, session: Session, row: RolloutRow, wave: dict[str, Any], now: float) -> None:
        """Assign the wave's devices the new release, remembering what each ran before."""
        ids = wave["devices"]
        before = {d.id: d for d in session.scalars(select(DeviceRow).where(DeviceRow.id.in_(ids)))}
        session.execute(delete(AssignmentRow).where(AssignmentRow.device_id.in_(ids)))
        session.execute(self.db.insert(AssignmentRow.__table__), [
            {"device_id": i, "rollout": row.id, "group_name": row.group, "rolled_back": False,
             "previous_bundle": before[i].bundle if i in before else None,
             "previous_version": before[i].version if i in before and before[i].bundle else None} for i in ids])
        wave["state"], wave["started"] = "installing", now
        log.info("rollout %d: %s started (%d devices)", row.id, wave["name"], len(ids))

    def _halt(self, session: Session, row: RolloutRow, reason: str, now: float, *, state: str = "halted",
              waves: list[dict[str, Any]] | None = None) -> None:
        """Every device of the rollout gets its previous release back as its desired state."""
        waves = copy.deepcopy(row.waves) if waves is None else waves
        current = waves[row.current_wave]
        if current["state"] in ("installing", "soaking"):
            current["state"] = "failed"
        row.waves = waves
        row.state, row.reason, row.rolled_back, row.updated = state, reason, True, now
        session.execute(update(AssignmentRow).where(AssignmentRow.rollout == row.id).values(rolled_back=True))
        log.warning("rollout %d %s, rolling back: %s", row.id, state, reason)

    def _done(self, session: Session, row: RolloutRow) -> None:
        """The group's release is the new one; its devices follow the group from now on."""
        row.state = "done"
        table = GroupRow.__table__
        session.execute(self.db.insert(table).values(name=row.group, rollout=row.id).on_conflict_do_update(
            index_elements=[table.c.name], set_={"rollout": row.id}))
        session.execute(delete(AssignmentRow).where(AssignmentRow.group == row.group))
        log.info("rollout %d done: group %s runs %s %s", row.id, row.group, row.bundle, row.version)


def _counters(before: DeviceRow | None, device_id: str, report: DeviceReport) -> dict[str, int]:
    """The device's counters over its rollout: they only grow while it reports the same rollout and release;
    lower ones mean it counted again from zero (a restart), so what it had counted is kept as a base."""
    health = report.health
    same = before is not None and (before.rollout, before.bundle, before.version) == (
        report.rollout, report.bundle, report.version)
    if not same:
        return {"events": health.events, "errors": health.errors, "events_base": 0, "errors_base": 0,
                "resets": before.resets if before is not None else 0}
    assert before is not None
    events_base, errors_base, resets = before.events_base or 0, before.errors_base or 0, before.resets or 0
    if health.events < before.events - events_base or health.errors < before.errors - errors_base:
        events_base, errors_base, resets = before.events, before.errors, resets + 1
        log.warning("device %s: its counters went down within rollout %s (%d events, %d errors after %d, %d): "
                    "counted as a reset", device_id, report.rollout, health.events, health.errors,
                    before.events - (before.events_base or 0), before.errors - (before.errors_base or 0))
    return {"events": min(events_base + health.events, MAX_COUNTER),
            "errors": min(errors_base + health.errors, MAX_COUNTER),
            "events_base": events_base, "errors_base": errors_base, "resets": resets}


def _get(session: Session, rollout_id: int, *, lock: bool = False) -> RolloutRow:
    row = session.get(RolloutRow, rollout_id, with_for_update=lock)
    if row is None:
        raise FleetError(f"no rollout {rollout_id}", status=404)
    return row


def _release(device_id: str, rollout: RolloutRow) -> Desired:
    return Desired(device_id=device_id, bundle=rollout.bundle, version=rollout.version, target=rollout.target,
                   rollout=rollout.id, gate=[GateRule.model_validate(g) for g in rollout.gate], soak_s=rollout.soak_s)


def _wanted(device_id: str, group: str, assignment: AssignmentRow | None, groups: dict[str, int],
            rollouts: dict[int, RolloutRow]) -> Desired:
    """A device's desired state: its rollout's release while it is in a started wave, its previous release
    after that rollout halted, else its group's release, else nothing."""
    if assignment is not None and assignment.group == group and assignment.rollout in rollouts:
        rollout = rollouts[assignment.rollout]
        if not assignment.rolled_back:
            return _release(device_id, rollout)
        bundle, version = assignment.previous_bundle, assignment.previous_version
        return Desired(device_id=device_id, bundle=bundle, version=version, rollout=rollout.id,
                       target=target_name(bundle, version) if bundle and version else None)
    if group in groups and groups[group] in rollouts:
        return _release(device_id, rollouts[groups[group]])
    return Desired(device_id=device_id)


def _device(row: DeviceRow, desired: Desired) -> Device:
    return Device(id=row.id, group=row.group, state=row.state, bundle=row.bundle, version=row.version,  # type: ignore[arg-type]
                  desired_version=desired.version, rollout=row.rollout, detail=row.detail,
                  health=Health(events=row.events, errors=row.errors, p99_ms=row.p99_ms, accuracy=row.accuracy),
                  counter_resets=row.resets or 0, last_seen=row.last_seen, usage=row.usage or {})
