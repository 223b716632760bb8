"""Signing releases (edgefn.fleet.signing) and fetching them on a device (edgefn.fleet.fetch), against
a real HTTP server that serves the operator's repository the way the fleet server does (/tuf/...).

Each attack is staged on the served copy: the operator's repository stays honest, the server lies."""

from __future__ import annotations

import functools
import hashlib
import json
import shutil
import stat
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from edgefn.errors import FleetError, UpdateRefused
from edgefn.fleet.fetch import ReleaseFetcher, check_not_older
from edgefn.fleet.pack import BundleInfo, build_bundle
from edgefn.fleet.signing import (
    ROLES,
    add_release,
    init_keys,
    keys_dir,
    metadata_dir,
    refresh_timestamp,
    targets_dir,
)


@pytest.fixture()
def bundle(tiny_fn: Path, tmp_path: Path):
    def make(version: str) -> BundleInfo:
        return build_bundle([tiny_fn], "tiny", version, tmp_path / "out" / f"tiny-{version}.tar", models=[])

    return make


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


class Server:
    """Serves `root` over HTTP; `publish` copies the operator's repository to /tuf/, as a fleet server would."""

    def __init__(self, root: Path):
        self.root = root
        self.tuf = root / "tuf"
        (self.tuf / "metadata").mkdir(parents=True)
        (self.tuf / "targets").mkdir()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(root)))
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def publish(self, ops: Path) -> None:
        shutil.copytree(metadata_dir(ops), self.tuf / "metadata", dirs_exist_ok=True)
        shutil.copytree(targets_dir(ops), self.tuf / "targets", dirs_exist_ok=True)

    def metadata(self, name: str) -> Path:
        return self.tuf / "metadata" / name

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


@pytest.fixture()
def server(tmp_path: Path) -> Iterator[Server]:
    s = Server(tmp_path / "served")
    yield s
    s.close()


@pytest.fixture()
def device(tmp_path: Path, ops: Path, server: Server):
    """A device's fetcher, given the operator's first root once."""
    def make() -> ReleaseFetcher:
        return ReleaseFetcher(tmp_path / "device" / "fleet", server.url, root_file=metadata_dir(ops) / "1.root.json")

    return make


def _release(ops: Path, server: Server, info: BundleInfo) -> list[Path]:
    files = add_release(ops, info.path)
    server.publish(ops)
    return files


# --- the operator's repository --------------------------------------------------------------------


def test_keys_init_writes_private_keys_and_the_first_root(ops: Path):
    for role in ROLES:
        pem = keys_dir(ops) / f"{role}.pem"
        assert pem.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
        assert stat.S_IMODE(pem.stat().st_mode) == 0o600
    root = json.loads((metadata_dir(ops) / "1.root.json").read_text())
    assert root["signed"]["_type"] == "root" and root["signed"]["consistent_snapshot"] is True
    assert set(root["signed"]["roles"]) == set(ROLES)
    assert (metadata_dir(ops) / "root.json").read_bytes() == (metadata_dir(ops) / "1.root.json").read_bytes()


def test_keys_init_refuses_to_replace_keys_without_force(ops: Path):
    before = (keys_dir(ops) / "root.pem").read_bytes()
    with pytest.raises(FleetError, match="already holds keys"):
        init_keys(ops)
    assert (keys_dir(ops) / "root.pem").read_bytes() == before
    init_keys(ops, force=True)
    assert (keys_dir(ops) / "root.pem").read_bytes() != before


def test_add_release_names_files_as_the_contract_says(ops: Path, bundle):
    info = bundle("1.0.0")
    first = add_release(ops, info.path)
    assert [p.name for p in first] == ["1.root.json", "1.targets.json", "1.snapshot.json", "timestamp.json"]
    assert (targets_dir(ops) / f"{info.sha256}.tiny-1.0.0.bundle.tar").read_bytes() == info.path.read_bytes()
    second = add_release(ops, bundle("1.1.0").path)
    assert [p.name for p in second] == ["2.targets.json", "2.snapshot.json", "timestamp.json"]
    targets = json.loads((metadata_dir(ops) / "2.targets.json").read_text())["signed"]["targets"]
    assert targets["tiny-1.0.0.bundle.tar"] == {"length": info.size, "hashes": {"sha256": info.sha256}}
    assert set(targets) == {"tiny-1.0.0.bundle.tar", "tiny-1.1.0.bundle.tar"}
    assert [p.name for p in refresh_timestamp(ops)] == ["timestamp.json"]
    assert json.loads((metadata_dir(ops) / "timestamp.json").read_text())["signed"]["version"] == 3


def test_add_release_refuses_other_bytes_under_a_released_version(ops: Path, bundle, tmp_path: Path):
    info = bundle("1.0.0")
    add_release(ops, info.path)
    other = tmp_path / "other.tar"
    shutil.copy(info.path, other)
    with open(other, "ab") as f:
        f.write(b"\0" * 512)  # still a tar with the same bundle.json, but other bytes
    with pytest.raises(FleetError, match="released already with other contents"):
        add_release(ops, other)


def test_a_key_not_in_the_root_cannot_sign(ops: Path, bundle, tmp_path: Path):
    init_keys(tmp_path / "other")
    shutil.copy(keys_dir(tmp_path / "other") / "targets.pem", keys_dir(ops) / "targets.pem")
    with pytest.raises(FleetError, match="not the targets key of this repository's root"):
        add_release(ops, bundle("1.0.0").path)


# --- the device -----------------------------------------------------------------------------------


def test_device_fetches_a_good_release_and_then_a_newer_one(ops: Path, server: Server, device, bundle):
    v1 = bundle("1.0.0")
    _release(ops, server, v1)
    fetcher = device()
    got = fetcher.fetch(v1.target)
    assert hashlib.sha256(got.read_bytes()).hexdigest() == v1.sha256
    assert fetcher.fetch(v1.target) == got  # verified copy reused
    v2 = bundle("1.1.0")
    _release(ops, server, v2)
    assert device().fetch(v2.target).read_bytes() == v2.path.read_bytes()


def test_device_refuses_a_target_whose_bytes_were_changed(ops: Path, server: Server, device, bundle):
    info = bundle("1.0.0")
    _release(ops, server, info)
    served = server.tuf / "targets" / f"{info.sha256}.{info.target}"
    data = bytearray(served.read_bytes())
    data[-1000] ^= 0xFF  # same length, one byte changed
    served.write_bytes(bytes(data))
    fetcher = device()
    with pytest.raises(UpdateRefused, match="wrong hash or length"):
        fetcher.fetch(info.target)
    assert not any(fetcher.downloads.iterdir())


def test_device_refuses_metadata_signed_with_a_key_its_root_does_not_name(ops: Path, server: Server, device,
                                                                          bundle, tmp_path: Path):
    device()  # the device trusts the operator's root
    rogue = tmp_path / "rogue"
    init_keys(rogue)
    info = bundle("1.0.0")
    add_release(rogue, info.path)  # a complete, well-formed release, signed by someone else
    server.publish(rogue)
    with pytest.raises(UpdateRefused, match="not signed by the keys the trusted root names"):
        device().fetch(info.target)


def test_device_refuses_a_rollback_to_metadata_older_than_it_trusts(ops: Path, server: Server, device, bundle,
                                                                    tmp_path: Path):
    v1 = bundle("1.0.0")
    _release(ops, server, v1)
    old = tmp_path / "old-metadata"
    shutil.copytree(server.tuf / "metadata", old)
    v2 = bundle("1.1.0")
    _release(ops, server, v2)
    device().fetch(v2.target)  # the device now trusts timestamp 2
    shutil.rmtree(server.tuf / "metadata")
    shutil.copytree(old, server.tuf / "metadata")  # validly signed, unexpired, but older
    with pytest.raises(UpdateRefused, match="rollback refused"):
        device().fetch(v1.target)


def test_device_refuses_an_expired_timestamp(ops: Path, server: Server, device, bundle):
    info = bundle("1.0.0")
    add_release(ops, info.path)
    refresh_timestamp(ops, expires_days=-1)  # signed, newer, but expired yesterday: a frozen view
    server.publish(ops)
    with pytest.raises(UpdateRefused, match="stale metadata"):
        device().fetch(info.target)


@pytest.mark.parametrize("role", ["targets", "snapshot"], ids=["targets-of-another-release",
                                                                 "snapshot-of-another-release"])
def test_device_refuses_metadata_mixed_from_two_releases(role: str, ops: Path, server: Server, device, bundle):
    v1 = bundle("1.0.0")
    _release(ops, server, v1)
    _release(ops, server, bundle("1.1.0"))
    # release 2's snapshot (timestamp) names 2.targets.json (2.snapshot.json); the server hands out
    # release 1's file under that name
    shutil.copy(server.metadata(f"1.{role}.json"), server.metadata(f"2.{role}.json"))
    with pytest.raises(UpdateRefused, match="mix-and-match refused"):
        device().fetch(v1.target)


def test_device_refuses_a_target_that_was_never_signed(ops: Path, server: Server, device, bundle):
    _release(ops, server, bundle("1.0.0"))
    with pytest.raises(UpdateRefused, match="not among the signed targets"):
        device().fetch("tiny-9.9.9.bundle.tar")


def test_device_without_a_server_says_it_is_unreachable(ops: Path, tmp_path: Path):
    fetcher = ReleaseFetcher(tmp_path / "fleet", "http://127.0.0.1:9", root_file=metadata_dir(ops) / "1.root.json",
                             timeout=2)
    with pytest.raises(FleetError, match="cannot be reached") as caught:
        fetcher.fetch("tiny-1.0.0.bundle.tar")
    assert not isinstance(caught.value, UpdateRefused)


def test_device_needs_a_root_once_and_keeps_it(ops: Path, tmp_path: Path, server: Server):
    with pytest.raises(FleetError, match="no trusted root yet"):
        ReleaseFetcher(tmp_path / "fleet", server.url)
    ReleaseFetcher(tmp_path / "fleet", server.url, root_file=metadata_dir(ops) / "1.root.json")
    again = ReleaseFetcher(tmp_path / "fleet", server.url)  # no root file needed any more
    assert again.root_path.read_bytes() == (metadata_dir(ops) / "1.root.json").read_bytes()


def test_check_not_older_orders_versions_as_pep_440():
    check_not_older(None, "1.0.0")
    check_not_older("1.2.0", "1.2.0")
    check_not_older("1.2.0", "1.10.0")  # not a string comparison
    with pytest.raises(UpdateRefused, match="older than 1.10.0"):
        check_not_older("1.10.0", "1.9.0")
    with pytest.raises(UpdateRefused, match="older than 2.0.0"):
        check_not_older("2.0.0", "2.0.0rc1")
    with pytest.raises(UpdateRefused, match="not a version"):
        check_not_older("1.0.0", "latest")
