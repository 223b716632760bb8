"""`edgefn bundle build`, `edgefn fleet keys init` and `edgefn fleet push`: making and signing releases."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich import box
from rich.markup import escape
from rich.table import Table

from edgefn.errors import ConfigError, FleetError
from edgefn.fleet_cli import TOKEN_ENV, cli_errors, fleet_app, keys_app, token_from_env
from edgefn.model_cli import format_size

if TYPE_CHECKING:
    from edgefn.fleet.bundle import BundleManifest

bundle_app = typer.Typer(help="Pack functions, their models and a health check into one signed-ready bundle.",
                         no_args_is_help=True)

UNPUBLISHED = "unpublished.json"  # in the keys folder: metadata signed here that the server has not taken yet


def _stdout():
    from edgefn.cli import out

    return out


def _contents_table(title: str, manifest: BundleManifest, entries: list[tuple[str, int]]) -> Table:
    table = Table(title=title, title_justify="left", box=box.SIMPLE, pad_edge=False, collapse_padding=True)
    table.add_column("path", no_wrap=True)
    table.add_column("size", justify="right", no_wrap=True)
    table.add_column("sha256", no_wrap=True)
    for path, size in entries:
        digest = manifest.files.get(path)
        table.add_row(escape(path), format_size(size), f"{digest[:16]}…" if digest else "")
    return table


def _summary(manifest: BundleManifest) -> str:
    functions = ", ".join(f"{f.name} {f.version}" for f in manifest.functions)
    return (f"[bold]{escape(manifest.name)} {escape(manifest.version)}[/]: functions {escape(functions)}; "
            f"models {escape(', '.join(manifest.models) or 'none')}; "
            f"health check {'yes' if manifest.health else 'none'}")


# --- bundle build / inspect -----------------------------------------------------------------------


@bundle_app.command("build")
def build_cmd(
    dirs: Annotated[list[Path], typer.Argument(metavar="DIR", help="Function folder, or a folder of them (each built first with "
                                                    "`edgefn fn build`).")],
    name: Annotated[str, typer.Option(help="The bundle's name (a-z, 0-9, '.', '_', '-'), e.g. digits.")],
    version: Annotated[str, typer.Option(help="The bundle's version (PEP 440, e.g. 1.4.0); devices refuse an older "
                                              "one than they run.")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="The bundle file to write "
                                                                 "(default: NAME-VERSION.bundle.tar here).")] = None,
    models: Annotated[list[Path] | None, typer.Option("--models", "-m", help="Folder of model folders to take the "
                                                                             "functions' models from (repeatable; "
                                                                             "default: models).")] = None,
    variants: Annotated[str | None, typer.Option(help="Ship only these variants of each model, e.g. fp32,int8 "
                                                      "(default: all of them).")] = None,
    health: Annotated[Path | None, typer.Option(help="health.json: sample events and the outputs a device must "
                                                     "see before it keeps the release.")] = None,
) -> None:
    """Pack built functions, the models they use and a health check into one reproducible tar.

    The same input gives the same bytes: the bundle is named by its sha256. Sign and upload it with
    `edgefn fleet push`.
    """
    from edgefn.fleet.pack import build_bundle
    from edgefn.protocol.fleet import target_name

    wanted = [v.strip() for v in variants.split(",") if v.strip()] if variants else None
    with cli_errors():
        if variants is not None and not wanted:
            raise ConfigError("--variants: give variant names, e.g. fp32,int8")
        info = build_bundle(dirs, name, version, out or Path(target_name(name, version)), models=models or [Path("models")],
                            variants=wanted, health=health)
    stdout = _stdout()
    stdout.print(f"wrote [bold]{escape(str(info.path))}[/] ({format_size(info.size)})", highlight=False)
    stdout.print(f"sha256 {info.sha256}", highlight=False)
    stdout.print(_summary(info.manifest), highlight=False)
    stdout.print(_contents_table(f"contents (target {info.target})", info.manifest, info.entries))


@bundle_app.command("inspect")
def inspect_cmd(
    file: Annotated[Path, typer.Argument(metavar="FILE", help="The bundle file (.bundle.tar).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print bundle.json (with the file's sha256) instead of "
                                                         "tables.")] = False,
) -> None:
    """Show what a bundle holds and check every file against the sha256 its bundle.json records."""
    from edgefn.fleet.bundle import file_sha256
    from edgefn.fleet.unpack import contents, verify_bundle

    with cli_errors():
        manifest = verify_bundle(file)
        entries = contents(file)
        sha = file_sha256(file)
    stdout = _stdout()
    if as_json:
        stdout.print_json(json.dumps({"sha256": sha, "target": manifest.target, **manifest.model_dump(mode="json")}))
        return
    stdout.print(f"[bold]{escape(str(file))}[/] ({format_size(file.stat().st_size)}), sha256 {sha}", highlight=False)
    stdout.print(_summary(manifest), highlight=False)
    stdout.print(_contents_table(f"contents (target {manifest.target})", manifest, entries))
    stdout.print(f"[green]every file matches bundle.json[/] ({len(manifest.files)} files checked)", highlight=False)


# --- fleet keys init ------------------------------------------------------------------------------


@keys_app.command("init")
def keys_init(
    repo_dir: Annotated[Path, typer.Argument(metavar="DIR", help="The operator's repository folder: keys/ and "
                                                                 "repository/ go in it.")],
    force: Annotated[bool, typer.Option(help="Replace existing keys and metadata (devices given the old root "
                                             "will refuse every new release).")] = False,
) -> None:
    """Make the Ed25519 keys of root, targets, snapshot and timestamp and the first (root) metadata.

    Keep DIR/keys private. Give every device DIR/repository/metadata/1.root.json once (its --fleet-root).
    """
    from edgefn.fleet.signing import ROLES, init_keys, keys_dir

    with cli_errors():
        root = init_keys(repo_dir, force=force)
    stdout = _stdout()
    for role in ROLES:
        stdout.print(f"{role:9} key  {escape(str(keys_dir(repo_dir) / f'{role}.pem'))} (0600)", highlight=False)
    stdout.print(f"root metadata  [bold]{escape(str(root))}[/]: give it to each device once "
                 "(edgefn run --fleet-root FILE)", highlight=False)


# --- fleet push -----------------------------------------------------------------------------------


def _pending(keys: Path) -> list[str]:
    try:
        return list(json.loads((keys / UNPUBLISHED).read_text())["files"])
    except FileNotFoundError:
        return []
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise FleetError(f"{keys / UNPUBLISHED}: unreadable ({exc}); delete it to push only the new metadata") from None


def _upload_order(name: str) -> tuple[int, int]:
    """root, targets, snapshot (each by version), then timestamp: the order a verifier needs them in."""
    version, _, role = name.partition(".")
    rank = {"root.json": 0, "targets.json": 1, "snapshot.json": 2}.get(role, 3)
    return (rank, int(version)) if version.isdigit() else (3, 0)


def _upload(server: str, bundle: Path | None, metadata: list[Path], token: str | None, timeout: float) -> dict:
    import httpx

    from edgefn.protocol.fleet import API

    url = f"{server.rstrip('/')}{API}/publish"
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with contextlib.ExitStack() as stack:
        files: list[tuple[str, tuple[str, object, str]]] = []
        if bundle is not None:
            files.append(("bundle", (bundle.name, stack.enter_context(open(bundle, "rb")), "application/x-tar")))
        files += [("metadata", (p.name, p.read_bytes(), "application/json")) for p in metadata]
        try:
            response = httpx.post(url, files=files, headers=headers, timeout=timeout)
        except httpx.HTTPError as exc:
            raise FleetError(f"{url}: cannot reach the fleet server: {exc}") from None
    if response.status_code >= 400:
        try:
            detail = response.json().get("error") or response.text
        except (ValueError, AttributeError):
            detail = response.text
        raise FleetError(f"{url}: the fleet server refused the release (HTTP {response.status_code}): "
                         f"{str(detail).strip() or response.reason_phrase}")
    try:
        body = response.json()
    except ValueError:
        body = {}
    return body if isinstance(body, dict) else {}


@fleet_app.command("push")
def push(
    keys: Annotated[Path, typer.Option(help="The operator's repository folder (`edgefn fleet keys init`).")],
    server: Annotated[str, typer.Option(help="The fleet server, e.g. http://HOST:8080.")],
    file: Annotated[Path | None, typer.Argument(metavar="FILE", help="The bundle to release (from `edgefn bundle build`); none "
                                                     "with --refresh.")] = None,
    expires_days: Annotated[float, typer.Option(min=0.001, help="Days until the new timestamp expires (devices "
                                                                 "refuse an expired one; re-sign with --refresh).")] = 7.0,
    refresh: Annotated[bool, typer.Option(help="Only re-sign the timestamp (a new expiry) and upload it.")] = False,
    token_env: Annotated[str | None, typer.Option(help=f"Environment variable holding a bearer token for the server "
                                                       f"(default: {TOKEN_ENV}, when it is set).")] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the server.")] = 120.0,
) -> None:
    """Sign a bundle into the repository (targets, snapshot, timestamp) and upload it with the new metadata.

    The repository in --keys keeps every signed version. Metadata the server did not take (it was down)
    is sent again with the next push.
    """
    from edgefn.fleet.bundle import file_sha256
    from edgefn.fleet.signing import add_release, keys_dir, metadata_dir, refresh_timestamp
    from edgefn.fleet.unpack import read_bundle

    stdout = _stdout()
    with cli_errors():
        if refresh and file is not None:
            raise ConfigError("--refresh re-signs the timestamp alone: give no bundle FILE")
        if not refresh and file is None:
            raise ConfigError("give the bundle FILE to push (or --refresh to re-sign the timestamp)")
        token = token_from_env(token_env)
        pending = _pending(keys_dir(keys))
        if refresh:
            new = refresh_timestamp(keys, expires_days=expires_days)
        else:
            assert file is not None
            bundle = read_bundle(file)
            new = add_release(keys, file, expires_days=expires_days)
        names = sorted({*pending, *(p.name for p in new)}, key=_upload_order)
        (keys_dir(keys) / UNPUBLISHED).write_text(json.dumps({"files": names}) + "\n")
        metadata = [metadata_dir(keys) / n for n in names]
        if refresh:
            stdout.print(f"signed timestamp (expires in {expires_days:g} days)", highlight=False)
        else:
            stdout.print(f"signed [bold]{escape(bundle.target)}[/] (sha256 {file_sha256(file)})", highlight=False)
        _upload(server, file, metadata, token, timeout)
        (keys_dir(keys) / UNPUBLISHED).unlink()
    stdout.print(f"uploaded to {escape(server)}: {escape(', '.join(names))}"
                 + (f" and {escape(file.name)}" if file is not None else ""), highlight=False)
