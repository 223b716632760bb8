"""`edgefn profile ...`: which device profile fits this machine and why, the profiles there are, one in full."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich import box
from rich.markup import escape
from rich.table import Table

from edgefn.cli._toolkit import cli_errors, out, print_json

if TYPE_CHECKING:
    from edgefn.profiles import DelegateSpec, Profile

profile_app = typer.Typer(help="Device profiles: detect this device's, list them, show one.", no_args_is_help=True)

PROFILES_HELP = ("Also load the profiles in this folder (repeatable); one named like a shipped profile "
                 "replaces it.")
JSON_HELP = "Print JSON instead of text."
ProfileDirs = Annotated[list[Path] | None, typer.Option("--profiles", help=PROFILES_HELP, metavar="DIR")]
AsJson = Annotated[bool, typer.Option("--json", help=JSON_HELP)]


def _dirs(extra: list[Path] | None) -> list[Path] | None:
    from edgefn.profiles import SHIPPED

    return [SHIPPED, *extra] if extra else None


def _print(text: Any) -> None:
    out.print(text, highlight=False)


@profile_app.command("detect")
def detect(
    root: Annotated[Path, typer.Option(help="Detect the device whose /proc, /etc, /sys and /dev are under this "
                                            "folder (a copy, or a test's fake tree).", metavar="DIR")] = Path("/"),
    as_json: AsJson = False,
    profiles: ProfileDirs = None,
) -> None:
    """Say which device profile fits this machine (or the tree under --root), why, and how it is doing now
    (temperature and memory against the profile's limits)."""
    from edgefn.profiles import detect as detect_profile
    from edgefn.profiles import load_profiles, pressure

    with cli_errors():
        found = detect_profile(root, load_profiles(_dirs(profiles)))
        now = pressure(found.profile, root)
    if as_json:
        print_json({"profile": found.profile.name, "fallback": found.fallback, "evidence": found.evidence,
                     "pressure": dataclasses.asdict(now) | {"ok": now.ok}})
        return
    p = found.profile
    how = "fallback: no profile matched, so the generic one of this arch" if found.fallback else "matched"
    _print(f"[bold]{p.name}[/] ({escape(p.profile.description)})\n{how}")
    _print("evidence:")
    for line in found.evidence:
        _print(f"  {escape(line)}")
    hottest = f"{now.hottest.type} {now.hottest.celsius:.1f} °C" if now.hottest else "no temperature"
    memory = f"{now.mem.available_mb} of {now.mem.total_mb} MB available" if now.mem else "no memory figures"
    _print(f"now: {escape(hottest)} ({now.thermal}), {memory} ({now.memory})")
    for reason in now.reasons:
        _print(f"  {escape(reason)}")


def _chain(specs: list[DelegateSpec]) -> str:
    return ", ".join(d.name for d in specs) or "-"


@profile_app.command("list")
def list_profiles(as_json: AsJson = False, profiles: ProfileDirs = None) -> None:
    """List the device profiles: their arch, accelerators and delegate chains."""
    from edgefn.profiles import load_profiles

    with cli_errors():
        found = load_profiles(_dirs(profiles))
    if as_json:
        print_json([{"name": p.name, "arch": p.arch, "generic": p.generic, "description": p.profile.description,
                      "source": str(p.source)} for p in found.values()])
        return
    table = Table(box=box.SIMPLE, pad_edge=False, caption="edgefn profile show NAME: the whole profile")
    for column in ("profile", "arch", "accelerators", "precisions", "onnxruntime", "litert", "rknn"):
        table.add_column(column, no_wrap=column == "profile")
    for p in found.values():
        accelerators = ", ".join(f"{a.kind}: {a.name}" for a in p.hardware.accelerators) or "-"
        table.add_row(p.name + (" (generic)" if p.generic else ""), p.arch, accelerators,
                      ", ".join(p.variant_preference), _chain(p.delegates_for("onnxruntime")),
                      _chain(p.delegates_for("litert")), _chain(p.delegates_for("rknn")))
    _print(table)


@profile_app.command("show")
def show(
    name: Annotated[str, typer.Argument(help="The profile's name (see `edgefn profile list`).")],
    as_json: AsJson = False,
    profiles: ProfileDirs = None,
) -> None:
    """Show one device profile in full: how it is recognised, its hardware, delegates, limits and capacity."""
    from edgefn.profiles import get_profile

    with cli_errors():
        p = get_profile(name, _dirs(profiles))
    if as_json:
        print_json(p.model_dump(mode="json") | {"source": str(p.source)})
        return
    info, hw = p.profile, p.hardware
    _print(f"[bold]{p.name}[/]: {escape(info.description)}\n"
           f"arch {p.arch}{', generic (the fallback of its arch)' if p.generic else ''}; from {escape(str(p.source))}")
    _print(_rules_table(p))
    _print(f"[bold]hardware[/]: {hw.cores} cores ({escape(hw.cpu)}), {hw.memory_mb} MB")
    for a in hw.accelerators:
        extra = [f"{a.tops:g} TOPS" if a.tops else "", f"{a.cores} cores" if a.cores else "",
                 f"sm {a.compute_capability}" if a.compute_capability else "", a.device or ""]
        _print(f"  {a.kind}: {escape(a.name)}" + "".join(f", {escape(e)}" for e in extra if e))
    _print(f"[bold]variant preference[/]: {' > '.join(p.variant_preference)}")
    _print(_delegates_table(p))
    thermal, c = p.limits.thermal, p.capacity
    _print(f"[bold]limits[/]: throttle at {thermal.throttle_c:g} °C, critical at {thermal.critical_c:g} °C "
           f"(zones: {escape(', '.join(thermal.zones) or 'all')}); at least {p.limits.memory.min_free_mb} MB free")
    _print(f"[bold]capacity[/]: {c.instances} instances, queue bound {c.queue_bound}, "
           f"latency budget {c.latency_budget_ms:g} ms, memory budget for instances "
           f"{f'{c.memory_budget_mb} MB' if c.memory_budget_mb is not None else 'unbounded'}")


def _rules_table(p: Profile) -> Table:
    table = Table(title=f"match (at least {p.match.min_score}, priority {p.match.priority})", title_justify="left",
                  box=box.SIMPLE, pad_edge=False)
    for column in ("score", "source", "rule"):
        table.add_column(column, justify="right" if column == "score" else "left")
    for rule in p.match.rules:
        what = rule.path if rule.source == "path" else \
            (f"{rule.field} contains " if rule.source == "cpuinfo" else "contains ") + repr(rule.contains)
        table.add_row(f"{rule.score:+d}", rule.source, escape(what))
    if not p.match.rules:
        table.add_row("", "-", "no rules: used when no other profile of its arch matches")
    return table


def _delegates_table(p: Profile) -> Table:
    table = Table(title="delegates, tried in order", title_justify="left", box=box.SIMPLE, pad_edge=False)
    for column in ("backend", "delegate", "runs with", "only variant", "options"):
        table.add_column(column)
    for backend in ("onnxruntime", "litert", "rknn"):
        for d in p.delegates_for(backend):
            runs = d.provider or d.library or ("built in" if d.builtin else "-")
            options = ", ".join(f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in d.options.items())
            options = options or "-"
            table.add_row(backend, d.name, runs, d.requires_variant or "-", escape(options))
    return table
