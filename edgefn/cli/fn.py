"""`edgefn fn ...`: scaffold a function, build it to a component, run one event through it with no broker."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from edgefn.cli._toolkit import build_stale, cli_errors, console, out
from edgefn.events import Message

fn_app = typer.Typer(help="Write, build and try functions.", no_args_is_help=True)


@fn_app.command("new")
def fn_new(
    name: Annotated[str, typer.Argument(help="Function name (a-z, 0-9, '-', '_').")],
    parent: Annotated[Path, typer.Option("--dir", help="Folder to create it in.")] = Path("."),
) -> None:
    """Scaffold a Python function: edgefn.toml, app.py and a sample event.json."""
    from edgefn.functions.build import scaffold

    with cli_errors():
        target = scaffold(name, parent)
    out.print(f"created {target}/ (edgefn.toml, app.py, event.json)\n"
              f"next: edgefn fn invoke {target} (builds it, then runs event.json through it)")


@fn_app.command("build")
def fn_build(
    folders: Annotated[list[Path], typer.Argument(help="Function folders.")],
    state_dir: Annotated[Path | None, typer.Option(help="Where to cache the precompiled component.")] = None,
    target: Annotated[str | None, typer.Option("--target", help="Compile for these CPUs instead of this one, e.g. "
                                                                "aarch64,x86_64: build/NAME.TARGET.cwasm beside the "
                                                                "component, for `edgefn bundle build --target`.")
                      ] = None,
) -> None:
    """Compile functions to WebAssembly components (componentize-py) and precompile them for this CPU, or
    for each --target."""
    from edgefn.config import default_state_dir
    from edgefn.errors import ConfigError
    from edgefn.functions.build import build as build_function
    from edgefn.functions.build import precompile_targets
    from edgefn.functions.compile import parse_targets
    from edgefn.functions.precheck import check_sources

    with cli_errors():
        try:
            targets = parse_targets(target) if target is not None else []
        except ValueError as exc:
            raise ConfigError(f"--target: {exc}") from None
        for folder in folders:  # every source checked (a moment) before any componentize-py (seconds)
            check_sources(folder)
    from edgefn.functions.sandbox import Runtime  # wasmtime: only once the sources are fine

    with cli_errors(), Runtime((state_dir or default_state_dir()) / "components") as runtime:
        for folder in folders:
            t0 = time.perf_counter()
            notes: list[str] = []
            with console.status(f"componentize-py {folder}"):
                wasm = build_function(folder, notes)
            for note in notes:
                console.print(note, markup=False, highlight=False)
            t1 = time.perf_counter()
            with console.status(f"precompiling {wasm.name} for {', '.join(targets) or 'this CPU'}"):
                if targets:
                    precompile_targets(wasm, targets)
                else:
                    runtime.load(wasm)
            t2 = time.perf_counter()
            out.print(f"built {wasm} ({wasm.stat().st_size / 1e6:.1f} MB) in {t1 - t0:.1f} s, precompiled "
                      f"for {', '.join(targets) or 'this CPU'} in {t2 - t1:.1f} s")


def _read_payload(payload: str) -> bytes:
    if payload.startswith("@"):
        path = Path(payload[1:])
        try:
            return path.read_bytes()
        except OSError as exc:
            raise typer.BadParameter(f"cannot read {path}: {exc.strerror}") from None
    return payload.encode()


@fn_app.command("invoke")
def fn_invoke(
    folder: Annotated[Path, typer.Argument(help="Function folder.")],
    topic: Annotated[str | None, typer.Option(help="Topic the event arrives on (default: the manifest's first "
                                                   "trigger, + as dev1 and # as test).")] = None,
    payload: Annotated[str | None, typer.Option(help="Payload text, or @FILE to read it from a file "
                                                     "(default: @FOLDER/event.json).")] = None,
    models: Annotated[list[Path] | None, typer.Option("--models", "-m", help="Folder of models (repeatable; "
                                                                             "default: ./models).")] = None,
    state: Annotated[Path | None, typer.Option(help="The function's state (host.state_get/set) between invokes "
                                                    "(default: FOLDER/build/invoke-state; never the daemon's).")] = None,
    fresh: Annotated[bool, typer.Option(help="Start from empty state.")] = False,
    state_dir: Annotated[Path | None, typer.Option(help="Compiled-component cache (default: the daemon's, "
                                                        "$XDG_STATE_HOME/edgefn, else ~/.local/state/edgefn).")] = None,
) -> None:
    """Run one event through a function, with no broker, and print the messages it would publish."""
    with cli_errors():
        messages, code = _invoke_once(folder, topic, payload, models, state, fresh, state_dir)
    for m in messages:
        out.print(_line(m), markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(code)


@fn_app.command("watch")
def fn_watch(
    folder: Annotated[Path, typer.Argument(help="Function folder.")],
    topic: Annotated[str | None, typer.Option(help="As for invoke (default: from the manifest's trigger).")] = None,
    payload: Annotated[str | None, typer.Option(help="As for invoke (default: @FOLDER/event.json).")] = None,
    models: Annotated[list[Path] | None, typer.Option("--models", "-m", help="Folder of models (repeatable; "
                                                                             "default: ./models).")] = None,
    state: Annotated[Path | None, typer.Option(help="As for invoke (default: FOLDER/build/invoke-state).")] = None,
    state_dir: Annotated[Path | None, typer.Option(help="Compiled-component cache (default: the daemon's).")] = None,
    runs: Annotated[int | None, typer.Option(min=1, help="Stop after this many runs (default: until Ctrl-C).")] = None,
    interval: Annotated[float, typer.Option(min=0.05, help="Seconds between looks at the sources.")] = 0.25,
) -> None:
    """Invoke a function now and again after each save: its sources are checked at once, then it is
    rebuilt and the event runs through it; each run says how long it took from the save."""
    from edgefn.errors import EdgefnError
    from edgefn.functions.build import watched_sources

    def snapshot() -> dict[Path, float]:
        return {p: p.stat().st_mtime for p in watched_sources(folder) if p.exists()}

    seen, done, saved_at = snapshot(), 0, time.time()
    while True:
        outcome = "answer"
        try:
            messages, _ = _invoke_once(folder, topic, payload, models, state, False, state_dir)
        except EdgefnError as exc:
            console.print(f"[bold red]error:[/] {escape(str(exc))}")
            outcome = "error"
        else:
            for m in messages:
                out.print(_line(m), markup=False, highlight=False, soft_wrap=True)
        took = time.time() - saved_at
        console.print(f"{'start' if done == 0 else 'save'} -> {outcome} in {took:.1f} s; watching {escape(str(folder))}",
                      highlight=False)
        done += 1
        if runs is not None and done >= runs:
            return
        seen, saved_at = next_save(snapshot, seen, interval)


def next_save(snapshot: Callable[[], dict[Path, float]], seen: dict[Path, float],
              interval: float) -> tuple[dict[Path, float], float]:
    """Wait for the sources' times to move from `seen`, then for them to stand still: a save can be more
    than one write (open truncates, then the bytes come; an editor writes, then renames), and the rest of
    one save must not look like the next. The times then, and when the save happened (its latest time)."""
    while (now := snapshot()) == seen:
        time.sleep(interval)
    while True:
        time.sleep(interval)
        if (later := snapshot()) == now:
            return now, max((m for p, m in now.items() if seen.get(p) != m), default=time.time())
        now = later


def _line(m: Message) -> str:
    """One message as `fn invoke` shows it: topic, payload, then whatever is not the default."""
    asked = ([] if m.qos == 1 else [f"qos {m.qos}"]) + (["retained"] if m.retain else [])
    asked += [f"{key}={value}" for key, value in m.properties]
    return f"{m.topic} {_shown(m.payload)}" + (f"  [{', '.join(asked)}]" if asked else "")


def _shown(payload: bytes) -> str:
    try:
        return json.dumps(json.loads(payload))
    except ValueError:
        return repr(payload)


def _invoke_once(folder: Path, topic: str | None, payload: str | None, models: list[Path] | None,
                 state: Path | None, fresh: bool, state_dir: Path | None) -> tuple[list, int]:
    """Build the function where it is stale, run one event through it; its messages, and 0 or 1 (failed)."""
    import shutil

    from edgefn.config import default_state_dir
    from edgefn.dispatch.worker import error_message  # the daemon's own host and error document
    from edgefn.errors import FunctionError
    from edgefn.events import Event
    from edgefn.functions.build import component_path, needs_build
    from edgefn.functions.host import FunctionHost
    from edgefn.functions.manifest import load_manifest
    from edgefn.functions.sandbox import FunctionSandbox, Runtime
    from edgefn.functions.state import StateStore
    from edgefn.inference.registry import ModelRegistry
    from edgefn.topics import example_topic, matches_any

    manifest = load_manifest(folder)
    triggers = manifest.trigger.topics
    if topic is None:
        topic = example_topic(triggers[0])
    elif not matches_any(topic, triggers):
        console.print(f"[yellow]warning:[/] {escape(topic)} matches none of {manifest.name}'s triggers "
                      f"({escape(', '.join(triggers))}): the daemon would not run it for this event")
    if payload is None:
        sample = Path(folder) / "event.json"
        if not sample.is_file():
            raise typer.BadParameter(f"no --payload, and no {sample} to take it from", param_hint="--payload")
        payload = f"@{sample}"
    body = _read_payload(payload)
    if needs_build(folder, manifest):
        build_stale([folder])
    registry = ModelRegistry(models or [Path("models")])
    state = state or Path(folder) / "build" / "invoke-state"
    if fresh:
        shutil.rmtree(state, ignore_errors=True)
    store = StateStore(state / "state.sqlite")
    with Runtime((state_dir or default_state_dir()) / "components") as runtime:
        one = manifest.model_copy(update={"limits": manifest.limits.model_copy(update={"instances": 1})})
        host = FunctionHost(manifest.name, registry, store, log_lines_per_s=manifest.limits.log_lines_per_s,
                            log_bytes_per_s=manifest.limits.log_bytes_per_s)
        sandbox = FunctionSandbox(runtime, one, component_path(folder, manifest), host)
        event = Event("invoke-1", topic, body, time.time() * 1000)
        try:
            return sandbox.handle(event), 0
        except FunctionError as exc:
            return [error_message(manifest, event, exc)], 1
        finally:
            sandbox.close()
            store.close()
