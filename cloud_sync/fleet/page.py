"""The fleet page served at `/`: devices, what each function costs on each (its "bill"), rollouts and the
audit trail at a glance, for an operator's browser.

Server-rendered HTML5 with a little inline CSS and a meta refresh, nothing fetched from elsewhere:
operators and devices may be offline, so the page must work without a CDN or a script. Every value
that came from a device or an operator is escaped, since device ids and reasons are free text.
Rows carry stable ids (`device-<id>`, `usage-<device>-<function>`, `rollout-<id>`, `rollout-<id>-wave-<n>`,
`audit-<id>`) so people and tests can find them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from html import escape

from edgefn.protocol.fleet import AuditEntry, Device, Rollout, Wave
from edgefn.protocol.fleet_text import (
    USAGE_COLUMNS,
    ago,
    audit_arguments_text,
    gate_values_text,
    usage_cells,
    wave_line,
)

REFRESH_S = 5

_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.4em;margin:0 0 .2em}h2{font-size:1.15em;margin:1.4em 0 .4em}
table{border-collapse:collapse;width:100%;margin-bottom:.8em}
th,td{border-bottom:1px solid #ddd;padding:.3em .6em;text-align:left;vertical-align:top}
th{background:#f4f4f4}.empty{color:#777;font-style:italic}.muted{color:#777}
.state{font-weight:600}.s-active,.s-done,.s-passed{color:#176b2c}
.s-failed,.s-rolled-back,.s-halted,.s-aborted{color:#a61b1b}
.s-paused,.s-soaking,.s-installing,.s-clock-skew{color:#8a5a00}.reason{color:#a61b1b}
ul.waves{margin:0;padding-left:1.1em}
"""


def render_page(devices: list[Device], rollouts: list[Rollout], *, now: float, audit: list[AuditEntry] = ()) -> str:
    """The whole page: devices, usage, rollouts and the newest audit entries; `now` makes times relative."""
    devices = sorted(devices, key=lambda d: (d.group, d.id))
    rollouts = sorted(rollouts, key=lambda r: r.id, reverse=True)  # the newest first
    return "\n".join([
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="refresh" content="{REFRESH_S}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>edgefn fleet</title><style>{_CSS}</style></head><body>",
        "<h1>edgefn fleet</h1>",
        f'<p class="muted">{len(devices)} device(s), {len(rollouts)} rollout(s); '
        f"refreshes every {REFRESH_S} s.</p>",
        _devices_section(devices, now),
        _usage_section(devices),
        _rollouts_section(rollouts),
        _audit_section(list(audit), now),
        "</body></html>",
    ])


def row_id(kind: str, key: object) -> str:
    """A stable HTML id for a row. Device ids are free text, so anything outside [A-Za-z0-9_.:-]
    becomes '_' (ids must not hold spaces; the escaped text stays in the cell)."""
    return f"{kind}-" + re.sub(r"[^A-Za-z0-9_.:-]", "_", str(key))


def _state(state: str) -> str:
    return f'<span class="state s-{escape(state)}">{escape(state)}</span>'


def _table(headers: Iterable[str], rows: list[str], *, table_id: str, empty: str) -> str:
    if not rows:
        return f'<p class="empty" id="{table_id}-empty">{escape(empty)}</p>'
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    return f'<table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>\n' + "\n".join(rows) + "\n</tbody></table>"


def _devices_section(devices: list[Device], now: float) -> str:
    rows = [_device_row(d, now) for d in devices]
    return "<h2>Devices</h2>\n" + _table(
        ("device", "group", "version", "state", "health", "last seen"), rows,
        table_id="devices", empty="No devices yet: they appear here when their agent first reports.")


def _device_row(d: Device, now: float) -> str:
    version = f"{d.bundle}@{d.version}" if d.bundle and d.version else "none"
    if d.desired_version and d.desired_version != d.version:
        version += f" → {d.desired_version}"
    detail = f'<div class="reason">{escape(d.detail)}</div>' if d.detail else ""
    h = d.health
    health = f"{h.events} events, {h.errors} errors"
    if h.p99_ms is not None:
        health += f", p99 {h.p99_ms:.1f} ms"
    if h.accuracy is not None:
        health += f", accuracy {h.accuracy:.3f}"
    return (f'<tr id="{escape(row_id("device", d.id))}" class="device s-{escape(d.state)}">'
            f'<td class="id">{escape(d.id)}</td><td>{escape(d.group)}</td>'
            f'<td class="version">{escape(version)}</td><td>{_state(d.state)}{detail}</td>'
            f"<td>{escape(health)}</td><td>{escape(ago(now - d.last_seen))}</td></tr>")


def _rollouts_section(rollouts: list[Rollout]) -> str:
    rows = [_rollout_row(r) for r in rollouts]
    return "<h2>Rollouts</h2>\n" + _table(
        ("rollout", "release", "group", "state", "progress", "waves"), rows,
        table_id="rollouts", empty="No rollouts yet: `edgefn fleet rollout create` starts one.")


def _rollout_row(r: Rollout) -> str:
    state = _state(r.state)
    if r.rolled_back:
        state += ' <span class="reason">rolled back</span>'
    if r.reason:
        state += f'<div class="reason">{escape(r.reason)}</div>'
    gate = ", ".join(str(rule) for rule in r.gate) or "no gate"
    waves = "".join(_wave_item(r, i, w) for i, w in enumerate(r.waves))
    return (f'<tr id="{escape(row_id("rollout", r.id))}" class="rollout s-{escape(r.state)}">'
            f"<td>#{r.id}</td><td>{escape(r.bundle)}@{escape(r.version)}</td><td>{escape(r.group)}</td>"
            f'<td>{state}</td><td class="progress">{escape(wave_line(r))}'
            f'<div class="muted">gate: {escape(gate)}; soak {r.soak_s:g} s</div></td>'
            f'<td><ul class="waves">{waves}</ul></td></tr>')


def _wave_item(r: Rollout, index: int, w: Wave) -> str:
    values = gate_values_text(w)
    measured = f' <span class="muted">({escape(values)})</span>' if values else ""
    return (f'<li id="{escape(row_id(f"rollout-{r.id}-wave", index))}">{escape(w.name)}: '
            f"{_state(w.state)} {w.healthy}/{len(w.devices)} healthy{measured}</li>")


def _usage_section(devices: list[Device]) -> str:
    rows = [f'<tr id="{escape(row_id("usage", f"{d.id}-{name}"))}" class="usage"><td>{escape(d.id)}</td>'
            f"<td>{escape(name)}</td>" + "".join(f"<td>{escape(c)}</td>" for c in usage_cells(u)) + "</tr>"
            for d in devices for name, u in sorted(d.usage.items())]
    return "<h2>Usage</h2>\n<p class=\"muted\">What each function has cost each device since its daemon " \
           "started: the device's bill.</p>\n" + _table(
        ("device", "function", *USAGE_COLUMNS), rows, table_id="usage",
        empty="No usage reported yet: devices report it with their state.")


def _audit_section(entries: list[AuditEntry], now: float) -> str:
    rows = [f'<tr id="{escape(row_id("audit", e.id))}" class="audit{" refused" if e.status >= 400 else ""}">'
            f"<td>{escape(ago(now - e.at))}</td><td>{escape(e.who)}</td><td>{escape(e.action)}</td>"
            f"<td>{escape(audit_arguments_text(e))}</td>"
            f'<td{" class=reason" if e.status >= 400 else ""}>{e.status}: {escape(e.result)}</td></tr>'
            for e in reversed(entries)]  # the newest first
    return "<h2>Audit trail</h2>\n" + _table(
        ("when", "who", "what", "arguments", "result"), rows, table_id="audit",
        empty="No operator action yet.")
