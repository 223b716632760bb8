"""Loading a release: the functions under some folders with their models, each with its sandbox,
host, planner and lanes, ready to serve (workers not started). A fleet release comes from its
unpacked bundle; without one, from --functions and --models.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from edgefn.config import Settings
from edgefn.dispatch.child import WorkerSpec
from edgefn.dispatch.lanes import Lane, LoadedFunction
from edgefn.dispatch.processes import RemoteSandbox, WorkerProcesses, default_workers
from edgefn.dispatch.share import Share
from edgefn.errors import EdgefnError
from edgefn.fleet.store import FleetStore, Release
from edgefn.functions.build import discover, runnable_component
from edgefn.functions.host import FunctionHost
from edgefn.functions.manifest import Manifest, load_manifest
from edgefn.functions.sandbox import FunctionSandbox, Runtime
from edgefn.functions.state import StateStore
from edgefn.inference.batching import Batcher
from edgefn.inference.choice import Choice
from edgefn.inference.delegates import chains_from_profile
from edgefn.inference.measured import LATENCY_FILE
from edgefn.inference.registry import ModelRegistry
from edgefn.observe.metrics import Metrics
from edgefn.observe.window import HealthWindow
from edgefn.offload.planner import Planner
from edgefn.profiles import Profile
from edgefn.protocol.offload import Policy
from edgefn.protocol.outputs import FUNCTION, MODELS, RELEASE
from edgefn.topics import ERRORS_TOPIC, filters_overlap

if TYPE_CHECKING:
    from edgefn.offload.client import CloudClient

log = logging.getLogger("edgefn.daemon")


class Loader:
    """Loads releases for one daemon: what they share is its settings, runtime, profile, state,
    cloud client and metrics."""

    def __init__(self, settings: Settings, runtime: Runtime, profile: Profile, state: StateStore,
                 cloud: CloudClient | None, metrics: Metrics, fleet: FleetStore):
        self.settings, self.runtime, self.profile, self.state = settings, runtime, profile, state
        self.cloud, self.metrics, self.fleet = cloud, metrics, fleet
        # Local functions (--functions) that did not load, by name -> why; the others serve. Folders
        # whose build failed before the daemon started (`broken`) count among them.
        self.failed: dict[str, str] = {}
        self.broken: dict[Path, str] = {}

    def load(self, release: Release | None, window: HealthWindow) -> tuple[ModelRegistry, list[LoadedFunction]]:
        """A fleet release's functions and models from its unpacked bundle; None: --functions and --models."""
        if release is None:
            return self._load(self.settings.functions, self.settings.models, release, window)
        folder = self.fleet.bundle_dir(release)
        return self._load([folder / "functions"], [folder / "models"], release, window)

    def _load(self, function_dirs: list[Path], model_dirs: list[Path], release: Release | None,
              window: HealthWindow) -> tuple[ModelRegistry, list[LoadedFunction]]:
        s = self.settings
        pins = s.model_variants if release is None else _pins_for(s.model_variants, model_dirs)
        registry = make_registry(s, self.profile, model_dirs, pins,
                                 on_load=lambda c: self.metrics.set_model_variant(c.model, c.variant, c.format,
                                                                                  c.delegate))
        batcher = Batcher(registry, self.cloud, max_calls=s.batch_max, wait_s=s.batch_wait_ms / 1000,
                          on_batch=self.metrics.observe_inference_batch)
        count = default_workers() if s.workers is None else s.workers
        processes = None if count == 0 else WorkerProcesses(
            count, WorkerSpec(s, self.profile, list(model_dirs), pins, [], self._worker_budget(count),
                              logging.getLogger().getEffectiveLevel()), self.state, self.metrics.usage,
            self.metrics.observe_inference_batch)
        functions: list[LoadedFunction] = []
        failed: dict[str, str] = {}
        try:
            for folder in self._function_folders(function_dirs, release):
                try:
                    if folder in self.broken:
                        raise EdgefnError(self.broken[folder])
                    functions.append(self._load_function(folder, registry, batcher, release, window, processes))
                except EdgefnError as exc:
                    if release is not None:
                        raise  # a fleet release loads whole or not at all: the agent rolls it back
                    name = _name_of(folder)
                    failed[name] = str(exc)
                    log.error("function %s does not load, the others serve: %s", name, exc)
            if processes is not None and any(isinstance(fn.sandbox, RemoteSandbox) for fn in functions):
                processes.start()
                if release is not None:  # a release is checked whole before it runs; the daemon's own
                    # functions load in the workers while intake already journals their events
                    for name, why in processes.ready().items():
                        raise EdgefnError(f"function {name} does not load in a worker process: {why}")
            if failed and not functions:
                raise EdgefnError("no function loads: " + "; ".join(f"{n}: {why}" for n, why in failed.items()))
        except BaseException:
            for fn in functions:
                fn.sandbox.close()
            raise
        self.failed = failed
        return registry, functions

    def _function_folders(self, paths: list[Path], release: Release | None) -> list[Path]:
        """The function folders under `paths`; none for a fleet device without local functions of its own,
        which runs nothing until the fleet assigns it a release."""
        if release is None and self.settings.fleet_only:
            log.info("no local functions: waiting for a release from the fleet")
            return []
        return discover(paths)

    def _worker_budget(self, count: int) -> int | None:
        """Each worker process's share of the device's memory budget for instances."""
        budget = self.profile.capacity.memory_budget_mb
        return None if budget is None else max(1, budget // count)

    def _load_function(self, folder: Path, registry: ModelRegistry, batcher: Batcher, release: Release | None,
                       window: HealthWindow, processes: WorkerProcesses | None) -> LoadedFunction:
        s = self.settings
        manifest = load_manifest(folder)
        wasm = runnable_component(folder, manifest)
        if not wasm.exists():
            raise EdgefnError(f"{folder}: not built yet (run: edgefn fn build {folder})")
        policy = self._policy(manifest)
        # Load now: a missing model fails the start, not an event. What each runs as goes out
        # with every output of the function (user property edgefn-models).
        choices = [registry.choice(model) for model in manifest.models.use]
        models = ",".join(f"{c.model}={c.variant}/{c.format}/{c.delegate}" for c in choices)
        properties = [(FUNCTION, f"{manifest.name}@{manifest.version}")]
        if release is not None:
            properties.append((RELEASE, release.label))
        if models:
            properties.append((MODELS, models))
        # `always`: the function's own lane hands every batch off; `on-overload`: a cloud lane of its own.
        # A worker per instance the function may scale up to; idle workers hold no instance.
        most = manifest.limits.instance_bounds[1]
        ordered = manifest.trigger.keeps_order(folder)
        sandbox: FunctionSandbox | RemoteSandbox
        if processes is not None and policy == "never":
            # Its batches run in the worker processes: as many at once as it may have instances in each
            # (one, if it keeps order). Compiled here first, so that every worker maps the cache.
            self.runtime.load(wasm)
            processes.add(manifest, folder, wasm)
            sandbox = RemoteSandbox(processes, manifest, ordered)
            lanes = {"local": Lane("local", 1 if ordered else most * processes.count)}
        else:
            lanes = {"local": Lane("cloud" if policy == "always" else "local", 1 if ordered else most)}
            if policy == "on-overload" and s.cloud_workers:
                lanes["cloud"] = Lane("cloud", s.cloud_workers)
            host = FunctionHost(manifest.name, registry, self.state, self.cloud, policy,
                                manifest.confidence_threshold, self.metrics, batcher=batcher,
                                log_lines_per_s=manifest.limits.log_lines_per_s,
                                log_bytes_per_s=manifest.limits.log_bytes_per_s)
            sandbox = FunctionSandbox(self.runtime, manifest, wasm, host,
                                      max_instances=sum(lane.workers for lane in lanes.values()))
        self.metrics.watch_instances(manifest.name, sandbox)
        planner = Planner(policy, manifest.latency_budget_ms, most,
                          cloud_workers=s.cloud_workers or 1)
        log.info("function %s %s from %s: triggered by %s", manifest.name, manifest.version, folder,
                 ", ".join(manifest.trigger.topics))
        _warn_of_loops(manifest)
        return LoadedFunction(manifest, sandbox, properties, planner, lanes, window,
                              Share(s.function_max_events, s.function_max_bytes))

    def _policy(self, manifest: Manifest) -> Policy:
        """--offload, else the manifest's, else on-overload where an endpoint is configured."""
        policy = self.settings.offload or manifest.offload or ("on-overload" if self.cloud else "never")
        if self.cloud is None and policy != "never":
            log.warning("%s: offload %s needs a cloud endpoint (--cloud); everything runs here",
                        manifest.name, policy)
            return "never"
        return policy


def make_registry(settings: Settings, profile: Profile, model_dirs: list[Path], pins: dict[str, str],
                  on_load: Callable[[Choice], None] | None = None) -> ModelRegistry:
    """The models under `model_dirs`, as this device runs them (the daemon's, and each worker process's)."""
    return ModelRegistry(
        model_dirs, variants=pins, on_load=on_load, chains=chains_from_profile(profile, settings.state_dir),
        precisions=profile.variant_preference, cpu_precisions=profile.cpu_variant_preference,
        search=settings.delegate_dirs, latency_file=settings.state_dir / LATENCY_FILE)


def _warn_of_loops(manifest: Manifest) -> None:
    """One line when the function may hear what it publishes (its results or its errors): each such
    event runs it again, up to max_hops times (edgefn-hop)."""
    published = [*manifest.publish.topics, ERRORS_TOPIC.format(function=manifest.name)]
    echoes = [(t, p) for t in manifest.trigger.topics for p in published if filters_overlap(t, p)]
    if echoes:
        log.warning("function %s is triggered by what it publishes (%s): each output runs it again, up to "
                    "max_hops times", manifest.name, ", ".join(f"trigger {t} takes {p}" for t, p in echoes))


def _name_of(folder: Path) -> str:
    """A function's name, from its manifest where that loads, else its folder's."""
    try:
        return load_manifest(folder).name
    except EdgefnError:
        return folder.name


def _pins_for(pins: dict[str, str], model_dirs: list[Path]) -> dict[str, str]:
    """The --model-variant pins that name a model a release ships (a release may not ship them all)."""
    shipped = {meta.parent.name for d in model_dirs for meta in Path(d).glob("*/model.json")}
    return {model: variant for model, variant in pins.items() if model in shipped}
