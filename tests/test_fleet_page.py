"""The fleet page, loaded in a real headless chromium: what an operator's browser actually shows.

Chromium is a system dependency (`make system-deps`); without it these tests fail rather than skip,
since a page nobody rendered is a page nobody checked."""

from __future__ import annotations

import shutil
import subprocess
import threading
from collections.abc import Iterator
from html.parser import HTMLParser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from cloud_sync.fleet.page import render_page, row_id
from edgefn.protocol.fleet import Device, Health, Rollout, Wave, parse_gate
from edgefn.protocol.fleet_text import ago, wave_line

NOW = 1_700_000_000.0
HOSTILE_ID = "<script>document.title='PWNED'</script>"


def dump_dom(url: str, profile: Path) -> str:
    """The DOM after chromium loaded the page and ran whatever scripts it holds."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "chromium is not installed: run `make system-deps`"
    done = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}",
         "--dump-dom", url],
        capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


class _Elements(HTMLParser):
    """Each element's tag and attributes, and the page's text by element id (for the assertions)."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text_by_id: dict[str, str] = {}
        self._open: list[str | None] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        self._open.append(dict(attrs).get("id"))
        if dict(attrs).get("id"):
            self.text_by_id.setdefault(dict(attrs)["id"], "")

    def handle_endtag(self, tag: str) -> None:
        if self._open:
            self._open.pop()

    def handle_data(self, data: str) -> None:
        for element_id in filter(None, self._open):
            self.text_by_id[element_id] += data


def parse(dom: str) -> _Elements:
    elements = _Elements()
    elements.feed(dom)
    return elements


def sample() -> tuple[list[Device], list[Rollout]]:
    devices = [
        Device(id="a-001", group="lab", state="active", bundle="digits", version="1.1.0", last_seen=NOW - 3,
               health=Health(events=120, errors=1, p99_ms=12.5)),
        Device(id="a-002", group="lab", state="rolled-back", bundle="digits", version="1.0.0",
               desired_version="1.0.0", detail="health check: sample h1 gave label 7", last_seen=NOW - 125),
        Device(id=HOSTILE_ID, group="lab", state="idle", last_seen=NOW - 1),
    ]
    good = Rollout(id=1, bundle="digits", version="1.1.0", group="lab", state="running", current_wave=1,
                   waves=[Wave(name="canary", devices=["a-001"], state="passed", healthy=1,
                               gate_values={"error_rate": 0.004, "p99_ms": 12.5}),
                          Wave(name="wave 1", devices=["a-001", "a-002", "a-003", "a-004", "a-005"],
                               state="soaking", healthy=3)],
                   gate=parse_gate("error_rate<0.01,p99_ms<50"), soak_s=30, created=NOW - 60, updated=NOW)
    bad = Rollout(id=2, bundle="digits", version="1.2.0", group="lab", state="halted", current_wave=0,
                  waves=[Wave(name="canary", devices=["a-002"], state="failed",
                              gate_values={"error_rate": 0.5})],
                  gate=parse_gate("error_rate<0.01"), soak_s=5, rolled_back=True,
                  reason="canary: gate error_rate<0.01 broken (0.5) <b>", created=NOW - 30, updated=NOW)
    return devices, [good, bad]


@pytest.fixture()
def serve_html() -> Iterator[callable]:
    """Serves a fixed HTML document at / from a tiny HTTP server thread; yields a setter -> URL."""
    page = {"html": ""}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (the http.server name)
            body = page["html"].encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()

    def set_page(html: str) -> str:
        page["html"] = html
        return f"http://127.0.0.1:{server.server_address[1]}/"

    yield set_page
    server.shutdown()
    server.server_close()
    thread.join(5)


def test_page_shows_devices_in_chromium(serve_html, tmp_path: Path) -> None:
    devices, rollouts = sample()
    dom = dump_dom(serve_html(render_page(devices, rollouts, now=NOW)), tmp_path / "profile")
    page = parse(dom)
    first = page.text_by_id["device-a-001"]
    assert "digits@1.1.0" in first and "active" in first and "3 s ago" in first and "p99 12.5 ms" in first
    second = page.text_by_id["device-a-002"]
    assert "rolled-back" in second and "2 min ago" in second and "sample h1 gave label 7" in second


def test_page_shows_halted_rollout_and_reason_in_chromium(serve_html, tmp_path: Path) -> None:
    devices, rollouts = sample()
    page = parse(dump_dom(serve_html(render_page(devices, rollouts, now=NOW)), tmp_path / "profile"))
    halted = page.text_by_id["rollout-2"]
    assert "halted" in halted and "rolled back" in halted
    assert "canary: gate error_rate<0.01 broken (0.5) <b>" in halted  # the reason, as text
    assert "error_rate=0.5" in page.text_by_id["rollout-2-wave-0"]
    running = page.text_by_id["rollout-1"]
    assert "digits@1.1.0" in running and "wave 1 (2/2): soaking 3/5 healthy" in running
    assert "error_rate<0.01, p99_ms<50" in running
    assert "p99_ms=12.5" in page.text_by_id["rollout-1-wave-0"]


def test_page_escapes_hostile_device_id_in_chromium(serve_html, tmp_path: Path) -> None:
    devices, rollouts = sample()
    dom = dump_dom(serve_html(render_page(devices, rollouts, now=NOW)), tmp_path / "profile")
    page = parse(dom)
    assert not [tag for tag, _ in page.tags if tag in ("script", "b")], "device text became markup"
    assert "<title>edgefn fleet</title>" in dom  # the hostile script never ran
    assert HOSTILE_ID in page.text_by_id[row_id("device", HOSTILE_ID)]


def test_page_empty_fleet_says_so_in_chromium(serve_html, tmp_path: Path) -> None:
    page = parse(dump_dom(serve_html(render_page([], [], now=NOW)), tmp_path / "profile"))
    assert "No devices yet" in page.text_by_id["devices-empty"]
    assert "No rollouts yet" in page.text_by_id["rollouts-empty"]
    refresh = [a for tag, a in page.tags if tag == "meta" and a.get("http-equiv") == "refresh"]
    assert refresh and refresh[0]["content"] == "5"
    # Nothing is loaded from elsewhere: the page must work on an offline operator's laptop.
    assert not [a for tag, a in page.tags if tag in ("link", "script", "img")]


def test_ago_words() -> None:
    assert [ago(s) for s in (-2, 0, 3, 59, 60, 125, 3600, 90000)] == [
        "0 s ago", "0 s ago", "3 s ago", "59 s ago", "1 min ago", "2 min ago", "1 h ago", "1 d ago"]


def test_wave_line_done_and_empty() -> None:
    _, (good, _) = sample()
    assert wave_line(good.model_copy(update={"state": "done"})) == "done: 2/2 waves passed"
    assert wave_line(good.model_copy(update={"waves": []})) == "no waves"
    assert row_id("device", "a b/<c>") == "device-a_b__c_"


def test_fleet_server_page_in_chromium(tiny_fn: Path, tmp_path: Path) -> None:
    """Devices report to the real fleet server, a rollout halts on one of them; the page at / shows it all."""
    import httpx

    from cloud_sync.fleet.server import start_fleet_server
    from edgefn.cli.fleet import _upload
    from edgefn.fleet.pack import build_bundle
    from edgefn.fleet.signing import add_release, init_keys, metadata_dir
    from edgefn.protocol.fleet import API, DeviceReport, RolloutRequest

    hostile = "<img src=x onerror=\"document.title='PWNED'\">"
    # tiny_fn: a stand-in component; the server handles bytes, not a working guest
    info = build_bundle([tiny_fn], "digits", "1.1.0", tmp_path / "digits-1.1.0.bundle.tar", models=[])
    init_keys(tmp_path / "ops")
    signed = add_release(tmp_path / "ops", info.path, expires_days=7)

    with start_fleet_server(tmp_path / "data", step_s=0, insecure=True,
                            fleet_root=metadata_dir(tmp_path / "ops") / "1.root.json") as server, \
            httpx.Client(base_url=server.url + API, timeout=10) as client:
        _upload(server.url, info.path, signed, None, 10)  # raises unless the server took the release

        def report(device_id: str, **fields: object) -> None:
            body = DeviceReport(group="lab", **fields).model_dump(mode="json")
            assert client.post(f"/devices/{device_id}/report", json=body).status_code == 200

        report("a-001", state="idle", health=Health(events=10, errors=0, p99_ms=4.0))
        report("a-002", state="active", bundle="digits", version="1.0.0")
        created = client.post("/rollouts", json=RolloutRequest(bundle="digits", version="1.1.0", group="lab",
                                                               canary=1).model_dump(mode="json"))
        assert created.status_code in (200, 201), created.text
        rollout_id = created.json()["id"]
        server.engine.step()  # the canary, a-001, is told to install
        report("a-001", state="rolled-back", rollout=rollout_id, target_version="1.1.0", detail=hostile)
        server.engine.step()  # ...and the rollout halts on its report

        dom = dump_dom(server.url + "/", tmp_path / "profile")
    page = parse(dom)
    assert "digits@1.0.0" in page.text_by_id["device-a-002"] and "active" in page.text_by_id["device-a-002"]
    assert "rolled-back" in page.text_by_id["device-a-001"]
    halted = page.text_by_id[f"rollout-{rollout_id}"]
    assert "halted" in halted and f"device a-001 reported rolled-back: {hostile}" in halted
    assert not [tag for tag, _ in page.tags if tag in ("img", "script")]
    assert "<title>edgefn fleet</title>" in dom
