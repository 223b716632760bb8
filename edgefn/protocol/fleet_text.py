"""The fleet's state in words: the lines that the operator's CLI (`edgefn fleet ...`) and the fleet page
(`cloud_sync.fleet.page`) both show. Imports nothing at run time, so the CLI loads it at start for free.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from edgefn.protocol.fleet import AuditEntry, FunctionUsage, Rollout, Wave

# The columns of a function's usage (its "bill"), in the order the CLI and the page show them.
USAGE_COLUMNS = ("invocations", "guest CPU", "peak memory", "infer here", "infer cloud", "bytes in", "bytes out")


def ago(seconds: float) -> str:
    """'42 s ago', '5 min ago', '3 h ago', '2 d ago'."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s} s ago"
    if s < 3600:
        return f"{s // 60} min ago"
    return f"{s // 3600} h ago" if s < 86400 else f"{s // 86400} d ago"


def gate_values_text(wave: Wave) -> str:
    """A wave's recorded gate values, e.g. "error_rate=0.002, p99_ms=n/a" (empty: none recorded)."""
    return ", ".join(f"{k}={'n/a' if v is None else f'{v:.4g}'}" for k, v in sorted(wave.gate_values.items()))


def wave_line(rollout: Rollout) -> str:
    """'wave 1 (2/3): soaking 3/5 healthy', or 'done' once every wave passed."""
    if rollout.state == "done":
        return f"done: {len(rollout.waves)}/{len(rollout.waves)} waves passed"
    if not rollout.waves:
        return "no waves"
    index = min(rollout.current_wave, len(rollout.waves) - 1)
    wave = rollout.waves[index]
    return (f"{wave.name} ({index + 1}/{len(rollout.waves)}): {wave.state} "
            f"{wave.healthy}/{len(wave.devices)} healthy")


def size_text(n: float) -> str:
    """'512 B', '12.4 MiB', '3.1 GiB'."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def usage_cells(u: FunctionUsage) -> tuple[str, ...]:
    """One function's usage in words, in USAGE_COLUMNS' order."""
    return (str(u.invocations), f"{u.guest_cpu_s:.3f} s", size_text(u.peak_memory_bytes),
            f"{u.infer_local_calls} calls, {u.infer_local_s:.3f} s", f"{u.infer_cloud_calls} calls, {u.infer_cloud_s:.3f} s",
            size_text(u.bytes_in), size_text(u.bytes_out))


def audit_arguments_text(entry: AuditEntry) -> str:
    """An entry's arguments as 'key=value, ...' (values as JSON would write them)."""
    import json

    return ", ".join(f"{k}={json.dumps(v, sort_keys=True)}" for k, v in entry.arguments.items())
