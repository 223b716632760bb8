"""`edgefn bundle build|inspect`: pack functions, their models and a health check into one reproducible
tar, and check one; `edgefn fleet push` signs and uploads it."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich import box
from rich.markup import escape
from rich.table import Table

from edgefn.cli._toolkit import cli_errors, format_size, out, print_json
from edgefn.errors import ConfigError

if TYPE_CHECKING:
    from edgefn.fleet.bundle import BundleManifest

bundle_app = typer.Typer(help="Pack functions, their models and a health check into one signed-ready bundle.",
                         no_args_is_help=True)


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
    functions = ", ".join(f"{f.name} {f.version}" + (f" (compiled for {', '.join(f.targets)})" if f.targets else "")
                          for f in manifest.functions)
    return (f"[bold]{escape(manifest.name)} {escape(manifest.version)}[/]: functions {escape(functions)}; "
            f"models {escape(', '.join(manifest.models) or 'none')}; "
            f"health check {'yes' if manifest.health else 'none'}")


@bundle_app.command("build")
def build_cmd(
    dirs: Annotated[list[Path], typer.Argument(metavar="DIR", help="Function folder, or a folder of them (each built first with "
                                                    "`edgefn fn build`).")],
    name: Annotated[str, typer.Option(help="The bundle's name (a-z, 0-9, '.', '_', '-'), e.g. digits.")],
    version: Annotated[str, typer.Option(help="The bundle's version (PEP 440, e.g. 1.4.0); devices refuse an older "
                                              "one than they run.")],
    out_file: Annotated[Path | None, typer.Option("--out", "-o", help="The bundle file to write "
                                                                      "(default: NAME-VERSION.bundle.tar here).")] = None,
    models: Annotated[list[Path] | None, typer.Option("--models", "-m", help="Folder of model folders to take the "
                                                                             "functions' models from (repeatable; "
                                                                             "default: models).")] = None,
    variants: Annotated[str | None, typer.Option(help="Ship only these variants of each model, e.g. fp32,int8 "
                                                      "(default: all of them).")] = None,
    health: Annotated[Path | None, typer.Option(help="health.json: sample events and the outputs a device must "
                                                     "see before it keeps the release.")] = None,
    target: Annotated[str | None, typer.Option("--target", help="Ship each function compiled for these CPUs, e.g. "
                                                                "aarch64,x86_64 (each built first with `edgefn fn "
                                                                "build --target`): a device of one compiles nothing.")
                      ] = None,
) -> None:
    """Pack built functions, the models they use and a health check into one reproducible tar.

    The same input gives the same bytes: the bundle is named by its sha256. Sign and upload it with
    `edgefn fleet push`.
    """
    from edgefn.fleet.pack import build_bundle
    from edgefn.functions.compile import parse_targets
    from edgefn.protocol.fleet import target_name

    wanted = [v.strip() for v in variants.split(",") if v.strip()] if variants else None
    with cli_errors():
        if variants is not None and not wanted:
            raise ConfigError("--variants: give variant names, e.g. fp32,int8")
        try:
            targets = parse_targets(target) if target is not None else []
        except ValueError as exc:
            raise ConfigError(f"--target: {exc}") from None
        info = build_bundle(dirs, name, version, out_file or Path(target_name(name, version)), models=models or [Path("models")],
                            variants=wanted, health=health, targets=targets)
    out.print(f"wrote [bold]{escape(str(info.path))}[/] ({format_size(info.size)})", highlight=False)
    out.print(f"sha256 {info.sha256}", highlight=False)
    out.print(_summary(info.manifest), highlight=False)
    out.print(_contents_table(f"contents (target {info.target})", info.manifest, info.entries))


@bundle_app.command("inspect")
def inspect_cmd(
    file: Annotated[Path, typer.Argument(metavar="FILE", help="The bundle file (.bundle.tar).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print bundle.json (with the file's sha256) instead of "
                                                         "tables.")] = False,
) -> None:
    """Show what a bundle holds and check every file against the sha256 its bundle.json records."""
    from edgefn.files import file_sha256
    from edgefn.fleet.unpack import contents, verify_bundle

    with cli_errors():
        manifest = verify_bundle(file)
        entries = contents(file)
        sha = file_sha256(file)
    if as_json:
        print_json({"sha256": sha, "target": manifest.target, **manifest.model_dump(mode="json")})
        return
    out.print(f"[bold]{escape(str(file))}[/] ({format_size(file.stat().st_size)}), sha256 {sha}", highlight=False)
    out.print(_summary(manifest), highlight=False)
    out.print(_contents_table(f"contents (target {manifest.target})", manifest, entries))
    out.print(f"[green]every file matches bundle.json[/] ({len(manifest.files)} files checked)", highlight=False)
