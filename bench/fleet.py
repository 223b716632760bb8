"""Fleet benchmark: one fleet server, one real device and hundreds of simulated ones, on loopback.

    server     `edgefn cloud serve --data DIR` started as the README says (the operator's token, the root
               pinned; a child process: its CPU time is read from /proc); every device is enrolled
               (`edgefn fleet devices enroll`) and speaks with its own token
    canary     `edgefn run --fleet URL --device-id a-000` with the digits function and a private
               mosquitto: the real agent, which downloads, verifies, compiles, activates and runs the
               bundle's health check. Every rollout names it the canary (--canary-device).
    the rest   --devices - 1 light agents (threads of this process) speaking the real protocol: report,
               poll the desired release with ETags, fetch it through python-tuf (ngclient: metadata
               refresh, the whole bundle downloaded and its hash checked), report each step and then
               `active` with a healthy window. They neither unpack nor run it (that is the canary's
               work); a light agent deletes what it downloaded.

  good rollout   digits 2.0.0 to every device: canary 1, waves 10,50,100 %, soak --soak seconds;
                 the time from create to done, the server's CPU seconds and requests/s.
  bad rollout    digits 2.1.0, whose function answers the wrong label: its health check fails on the
                 canary, which rolls itself back; the rollout must halt at the canary, and no device
                 outside it may ever have run 2.1.0 (checked on every light agent's own record and on
                 the server's view).

    .venv/bin/python bench/fleet.py [--devices 500] [--poll 2] [--soak 2] [--json-only]

Results also go to bench/results/fleet.json. Exit status 0 whatever the figures (1 if it could not run).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).parent))
import e2e  # noqa: E402  (child processes, CPU time, digits images)

from edgefn.errors import FleetError  # noqa: E402
from edgefn.fleet.fetch import ReleaseFetcher  # noqa: E402
from edgefn.mqtt.local_broker import LocalBroker, free_port  # noqa: E402
from edgefn.protocol.fleet import API, Desired, DeviceReport, Health  # noqa: E402

RESULTS = e2e.ROOT / "bench" / "results" / "fleet.json"
GROUP = "bench"
CANARY_ID = "a-000"


class LightDevice:
    """One simulated device: what it runs, what it ran, and its own trusted TUF metadata."""

    def __init__(self, device_id: str, fleet_dir: Path, server: str, root: Path, token: str):
        self.id = device_id
        self.auth = {"authorization": f"Bearer {token}"}  # its credential from the enrollment
        self.fetcher = ReleaseFetcher(fleet_dir, server, root)
        self.current: Desired | None = None  # the release it runs (None: its local functions)
        self.etag: str | None = None
        self.ran: list[str] = []  # every version it ever activated, in order
        self.due = 0.0

    def running(self) -> tuple[str | None, str | None]:
        return (self.current.bundle, self.current.version) if self.current else (None, None)


class LightFleet:
    """`devices` light agents served by `workers` threads, each thread owning a slice of them."""

    def __init__(self, server: str, root: Path, work: Path, tokens: dict[str, str], poll_s: float,
                 workers: int = 24):
        self.server, self.poll_s = server, poll_s
        self.devices = [LightDevice(i, work / i, server, root, token) for i, token in tokens.items()]
        self.requests = Counter[str]()
        self.errors: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._serve, args=(self.devices[k::workers],), daemon=True,
                                          name=f"light-{k}") for k in range(workers)]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(30)

    def _count(self, kind: str) -> None:
        with self._lock:
            self.requests[kind] += 1

    def _serve(self, devices: list[LightDevice]) -> None:
        with httpx.Client(base_url=self.server, timeout=30) as http:
            for d in devices:  # register, spread over the first poll interval
                d.due = time.monotonic() + random.uniform(0, self.poll_s)
                self._report(http, d, "idle")
            while not self._stop.is_set():
                now = time.monotonic()
                for d in devices:
                    if d.due <= now and not self._stop.is_set():
                        d.due = now + self.poll_s
                        try:
                            self._tick(http, d)
                        except (httpx.HTTPError, FleetError, ValueError) as exc:
                            with self._lock:
                                self.errors.append(f"{d.id}: {exc}")
                self._stop.wait(0.02)

    def _report(self, http: httpx.Client, d: LightDevice, state: str, target: Desired | None = None,
                detail: str = "", health: Health | None = None) -> None:
        bundle, version = d.running()
        report = DeviceReport(group=GROUP, state=state, bundle=bundle, version=version,
                              rollout=target.rollout if target else None,
                              target_version=target.version if target else None, detail=detail,
                              health=health or Health(), agent="bench-light")
        http.post(f"{API}/devices/{d.id}/report", content=report.model_dump_json(),
                  headers={"content-type": "application/json", **d.auth}).raise_for_status()
        self._count("report")

    def _tick(self, http: httpx.Client, d: LightDevice) -> None:
        response = http.get(f"{API}/devices/{d.id}/desired",
                            headers={**d.auth, **({"if-none-match": d.etag} if d.etag else {})})
        self._count("desired")
        if response.status_code == 304:
            return
        response.raise_for_status()
        d.etag = response.headers.get("etag")
        desired = Desired.model_validate_json(response.content)
        if (desired.bundle, desired.version) == d.running():
            return
        if desired.bundle is None:  # back to the local functions
            d.current = None
            self._report(http, d, "active")
            return
        for step in ("downloading", "verifying"):
            self._report(http, d, step, desired)
        path = d.fetcher.fetch(desired.target)  # refresh, download, verify (raises on any refusal)
        self._count("tuf")
        path.unlink()  # a light agent keeps nothing
        for step in ("compiling", "activating"):
            self._report(http, d, step, desired)
        d.current = desired
        d.ran.append(desired.version)
        self._report(http, d, "checking", desired)
        self._report(http, d, "active", desired, health=Health(events=100, errors=0, p99_ms=4.0))


def _server_get(http: httpx.Client, path: str) -> Any:
    response = http.get(path)
    response.raise_for_status()
    return response.json()


def _cli(*args: str) -> str:
    import subprocess

    done = subprocess.run([sys.executable, "-m", "edgefn.cli", *args], cwd=e2e.ROOT, capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "200"})
    if done.returncode != 0:
        raise e2e.BenchError(f"edgefn {' '.join(args)} failed:\n{done.stdout}{done.stderr}")
    return done.stdout


def _health_file(work: Path) -> Path:
    images, labels = e2e._digits()
    samples = [{"topic": "sensors/h/digits", "payload": {"id": f"h{i}", "pixels": images[i]},
                "expect": [{"topic": "results/h/digits", "json": {"event_id": f"h{i}", "label": labels[i]}}]}
               for i in (0, 1, 2)]
    path = work / "health.json"
    path.write_text(json.dumps({"samples": samples}))
    return path


def _function(work: Path, version: str, wrong: bool) -> Path:
    """The digits example at `version`; `wrong`: it answers the next label (a bad release)."""
    folder = work / f"digits-{version}" / "digits"
    shutil.copytree(e2e.FUNCTION, folder, ignore=shutil.ignore_patterns("build", "__pycache__"))
    manifest = folder / "edgefn.toml"
    manifest.write_text(manifest.read_text().replace('version = "1.0.0"', f'version = "{version}"'))
    if wrong:
        app = folder / "app.py"
        source = app.read_text()
        marker = "def _answer(event, doc, label, probs, ran_on):\n"
        if marker not in source:
            raise e2e.BenchError("examples/functions/digits/app.py changed: cannot make the bad release")
        app.write_text(source.replace(marker, marker + "    label = (label + 1) % 10  # the regression\n"))
    e2e.ensure_built(folder)
    return folder


def _rollout(http: httpx.Client, server: str, keys: Path, bundle: Path, version: str, args: argparse.Namespace,
             fleet: LightFleet, server_pid: int | None) -> dict[str, Any]:
    _cli("fleet", "push", str(bundle), "--keys", str(keys), "--server", server)
    before_cpu, before_requests = e2e._cpu_seconds(server_pid), sum(fleet.requests.values())
    started = time.perf_counter()
    created = json.loads(_cli("fleet", "rollout", "create", "--bundle", f"digits@{version}", "--group", GROUP,
                              "--canary-device", CANARY_ID, "--waves", "10,50,100", "--gate", "error_rate<0.01,p99_ms<50",
                              "--soak", f"{args.soak}s", "--wave-timeout", f"{args.wave_timeout}s",
                              "--server", server, "--json"))
    rollout_id = created["id"]
    while True:
        rollout = _server_get(http, f"{API}/rollouts/{rollout_id}")
        if rollout["state"] in ("done", "halted", "aborted"):
            break
        if time.perf_counter() - started > args.timeout:
            raise e2e.BenchError(f"rollout {rollout_id} still {rollout['state']} after {args.timeout} s")
        time.sleep(0.2)
    took = time.perf_counter() - started
    after_cpu = e2e._cpu_seconds(server_pid)
    requests = sum(fleet.requests.values()) - before_requests
    return {"id": rollout_id, "state": rollout["state"], "reason": rollout.get("reason", ""),
            "rolled_back": rollout.get("rolled_back"), "seconds": round(took, 2),
            "waves": [{"name": w["name"], "devices": len(w["devices"]), "state": w["state"]} for w in rollout["waves"]],
            "server_cpu_s": None if before_cpu is None or after_cpu is None else round(after_cpu - before_cpu, 2),
            "light_requests": requests, "light_requests_per_s": round(requests / took, 1)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="edgefn-bench-fleet-"))
    systems: list[e2e.System] = []
    broker = None
    fleet: LightFleet | None = None
    try:
        print("building the functions of 2.0.0 (good) and 2.1.0 (bad) ...", file=sys.stderr)
        e2e.ensure_built(e2e.FUNCTION)
        health = _health_file(work)
        bundles = {}
        for version, wrong in (("2.0.0", False), ("2.1.0", True)):
            bundles[version] = work / f"digits-{version}.bundle.tar"
            _cli("bundle", "build", str(_function(work, version, wrong)), "--name", "digits", "--version", version,
                 "--models", str(e2e.MODELS), "--variants", "fp32", "--health", str(health),
                 "-o", str(bundles[version]))
        keys = work / "keys"
        _cli("fleet", "keys", "init", str(keys))
        root = keys / "repository" / "metadata" / "1.root.json"
        os.environ["EDGEFN_FLEET_TOKEN"] = (keys / "operator.token").read_text().strip()  # for every _cli

        port = free_port()
        server = e2e.System("server", [sys.executable, "-m", "edgefn.cli", "cloud", "serve", "--data",
                                       str(work / "server"), "--port", str(port), "--fleet-root", str(root),
                                       "--token-file", str(keys / "operator.token"), "--log-level", "warning"], work)
        systems.append(server)
        server.start()
        url = f"http://127.0.0.1:{port}"
        http = httpx.Client(base_url=url, timeout=30)
        deadline = time.monotonic() + 30
        while True:
            server.check()
            try:
                http.get(f"{API}/devices").raise_for_status()
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline:
                    raise e2e.BenchError(f"the fleet server did not answer:\n{server.log_tail()}") from None
                time.sleep(0.2)

        canary_token = work / "canary.token"
        _cli("fleet", "devices", "enroll", CANARY_ID, "--group", GROUP, "--server", url, "--token-out",
             str(canary_token))
        started = time.perf_counter()
        operator = {"authorization": f"Bearer {os.environ['EDGEFN_FLEET_TOKEN']}"}
        tokens = {}
        for n in range(1, args.devices):
            answer = http.post(f"{API}/enrollments", json={"device_id": f"d-{n:03d}", "group": GROUP},
                               headers=operator)
            answer.raise_for_status()
            tokens[f"d-{n:03d}"] = answer.json()["token"]
        enroll_s = time.perf_counter() - started

        broker = LocalBroker().start()
        canary = e2e.edgefn_run("canary", broker.url, work, [e2e.FUNCTION], "--fleet", url, "--device-id", CANARY_ID,
                                "--group", GROUP, "--fleet-root", str(root), "--device-token-file", str(canary_token),
                                "--fleet-poll", str(args.poll), log_level="info")
        systems.append(canary)
        canary.start()

        fleet = LightFleet(url, root, work / "light", tokens, args.poll)
        fleet.start()
        deadline = time.monotonic() + 60
        while len(_server_get(http, f"{API}/devices")["devices"]) < args.devices:
            canary.check()
            if time.monotonic() > deadline:
                raise e2e.BenchError(f"not every device registered:\n{canary.log_tail()}")
            time.sleep(0.5)

        print(f"good rollout of digits 2.0.0 to {args.devices} devices ...", file=sys.stderr)
        good = _rollout(http, url, keys, bundles["2.0.0"], "2.0.0", args, fleet, server.proc.pid)
        devices = _server_get(http, f"{API}/devices")["devices"]
        good["devices_on_it"] = sum(d["version"] == "2.0.0" and d["state"] == "active" for d in devices)

        print("bad rollout of digits 2.1.0 (its health check fails) ...", file=sys.stderr)
        bad = _rollout(http, url, keys, bundles["2.1.0"], "2.1.0", args, fleet, server.proc.pid)
        time.sleep(2 * args.poll)  # every light agent polls again after the halt
        devices = {d["id"]: d for d in _server_get(http, f"{API}/devices")["devices"]}
        bad["canary"] = {k: devices[CANARY_ID].get(k) for k in ("state", "version", "detail")}
        bad["outside_canary_ever_ran_it"] = sorted(d.id for d in fleet.devices if "2.1.0" in d.ran)
        bad["outside_canary_on_it_now"] = sorted(i for i, d in devices.items() if i != CANARY_ID
                                                 and d["version"] == "2.1.0")
        bad["halted_at_canary"] = bad["state"] == "halted" and bad["waves"][0]["state"] == "failed" and all(
            w["state"] == "pending" for w in bad["waves"][1:])
        return {"devices": args.devices, "enrolled_in_s": round(enroll_s, 2), "poll_s": args.poll,
                "soak_s": args.soak, "cpus": os.cpu_count(),
                "bundle_bytes": bundles["2.0.0"].stat().st_size, "good": good, "bad": bad,
                "light_agent_errors": fleet.errors[:10], "light_agent_error_count": len(fleet.errors),
                "requests_by_kind": dict(fleet.requests)}
    finally:
        if fleet is not None:
            fleet.stop()
        for s in reversed(systems):
            s.stop()
        if broker is not None:
            broker.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def _print(doc: dict[str, Any]) -> None:
    g, b = doc["good"], doc["bad"]
    print(f"\nfleet of {doc['devices']} devices (1 real daemon + {doc['devices'] - 1} light agents), "
          f"poll {doc['poll_s']} s, soak {doc['soak_s']} s, bundle {doc['bundle_bytes'] / 1e6:.1f} MB; "
          f"{doc['devices'] - 1} enrolled in {doc['enrolled_in_s']} s")
    print(f"good rollout: {g['state']} in {g['seconds']} s; {g['devices_on_it']}/{doc['devices']} devices active on "
          f"2.0.0; server CPU {g['server_cpu_s']} s; light agents' requests {g['light_requests']} "
          f"({g['light_requests_per_s']}/s)")
    print(f"bad rollout:  {b['state']} in {b['seconds']} s ({b['reason']}); halted at the canary: "
          f"{b['halted_at_canary']}; canary now {b['canary']['version']} ({b['canary']['state']}); devices outside "
          f"the canary that ever ran it: {len(b['outside_canary_ever_ran_it'])}")
    print(f"light agent errors: {doc['light_agent_error_count']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=500, help="devices in the fleet, the real canary included")
    parser.add_argument("--poll", type=float, default=2.0, help="seconds between a device's polls")
    parser.add_argument("--soak", type=float, default=2.0, help="seconds each wave soaks")
    parser.add_argument("--wave-timeout", type=float, default=300.0, help="seconds a wave may take")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds a rollout may take in all")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs, state)")
    parser.add_argument("--json-only", action="store_true", help="print only the JSON document")
    args = parser.parse_args(argv)
    try:
        doc = run(args)
    except e2e.BenchError as exc:
        print(f"bench/fleet.py: {exc}", file=sys.stderr)
        return 1
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(doc, indent=2) + "\n")
    if args.json_only:
        print(json.dumps(doc, indent=2))
    else:
        _print(doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
