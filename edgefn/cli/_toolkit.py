"""What every `edgefn` command shares: the consoles, the error exit, formats, and the fleet server's call.

Command modules import this and edgefn internals, never each other and never `main`. It stays light
(typer, rich, edgefn.errors): `edgefn --help` imports it, so heavier imports wait inside functions.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Literal, NoReturn

import typer
from rich.console import Console
from rich.markup import escape

from edgefn.errors import ConfigError, EdgefnError, FleetError

out = Console()  # what a command answers: tables, JSON, results
console = Console(stderr=True)  # what it says on the way: errors, progress, where it serves


# ---- errors and logs ----

def fail(exc: Exception) -> NoReturn:
    """One line on stderr and exit code 2: how every edgefn error ends a command."""
    # The message is text, not markup: "[/tmp/x]" or "[models]" in it must print as written; nor emoji
    # codes: "http://HOST:abc: port" printed a 🔤 for ":abc:".
    console.print(f"[bold red]error:[/] {escape(str(exc))}", emoji=False)
    raise typer.Exit(2)


@contextlib.contextmanager
def cli_errors() -> Iterator[None]:
    """An EdgefnError raised inside becomes `fail`'s one line and exit code 2."""
    try:
        yield
    except EdgefnError as exc:
        fail(exc)


LogLevel = Literal["debug", "info", "warning", "error"]


# Libraries whose INFO lines are per request (httpx logs every hand-off): shown at debug only.
CHATTY_LOGGERS = ("httpx", "httpcore")


def setup_logging(level: str) -> None:
    value = getattr(logging, level.upper(), logging.INFO)
    logging.basicConfig(level=value, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.NOTSET if value <= logging.DEBUG else max(value, logging.WARNING))


# ---- options ----

CLOUD_MODEL_HELP = ("MODEL=NAME[,TENSOR=NAME...]: the endpoint serves MODEL under another name, and names "
                    "some of its inputs or outputs otherwise, e.g. digits=digits-sk,label=predict,"
                    "probabilities=predict_proba (repeatable).")


def name_values(flag: str, values: list[str] | None) -> dict[str, str] | None:
    """["a=b", ...] -> {"a": "b", ...}; None when the flag was not given."""
    if not values:
        return None
    pairs = [v.split("=", 1) for v in values]
    bad = [v for v, p in zip(values, pairs, strict=True) if len(p) != 2 or not all(p)]
    if bad:
        raise typer.BadParameter(f"{bad[0]!r} is not NAME=VALUE", param_hint=flag)
    return dict(pairs)


# ---- output ----

def print_json(doc: Any) -> None:
    """A document for scripts, on stdout, indented; never wrapped."""
    out.print_json(data=doc)


def _three_digits(value: float) -> str:
    return f"{value:.{2 if value < 10 else 1 if value < 100 else 0}f}"


def format_ms(ms: float) -> str:
    """A latency for a table: microseconds below a millisecond, where tiny models live."""
    return f"{ms * 1000:.0f} µs" if ms < 1 else f"{_three_digits(ms)} ms"


def format_size(size: int) -> str:
    return f"{_three_digits(size / 1e6)} MB" if size >= 1e6 else f"{_three_digits(size / 1e3)} kB"


# ---- functions ----

def build_stale(paths: list[Path], *, keep_going: bool = False) -> dict[Path, str]:
    """Build the functions under `paths` whose component is missing or older than their source, each
    with a line saying why and how long it took. With `keep_going`, a function that fails to build is
    said and skipped (the folder -> why is returned); without, its BuildError ends the command."""
    import time

    from edgefn.errors import BuildError, ManifestError
    from edgefn.functions.build import build as build_function
    from edgefn.functions.build import discover, why_build
    from edgefn.functions.manifest import load_manifest

    failed: dict[Path, str] = {}
    for folder in discover(paths):
        try:
            why = why_build(folder, load_manifest(folder))
            if why is None:
                continue
            started, notes = time.monotonic(), []
            with console.status(f"building {folder} ({why}; componentize-py, about 10 s)"):
                wasm = build_function(folder, notes)
            for note in notes:
                console.print(note, markup=False, highlight=False)
            console.print(f"built {escape(str(wasm))} ({why}) in {time.monotonic() - started:.1f} s")
        except (BuildError, ManifestError) as exc:
            if not keep_going:
                raise
            failed[folder] = str(exc)
            console.print(f"[bold red]error:[/] {escape(str(exc))}")
    return failed


# ---- the fleet server ----

SERVER_ENV = "EDGEFN_FLEET_SERVER"
TOKEN_ENV = "EDGEFN_FLEET_TOKEN"

# The options of every command that talks to the fleet server.
ServerOpt = Annotated[str, typer.Option(envvar=SERVER_ENV, show_envvar=True,
                                        help="The fleet server, e.g. http://HOST:8080.")]
TokenEnvOpt = Annotated[str | None, typer.Option(help=f"Environment variable holding a bearer token for the server "
                                                      f"(default: {TOKEN_ENV}, when it is set).")]
TimeoutOpt = Annotated[float, typer.Option(min=0.1, help="Seconds to wait for the server.")]


def token_from_env(token_env: str | None, *, fallback: str | None = TOKEN_ENV) -> str | None:
    """The bearer token in the variable --token-env names, else in `fallback` when that is set.

    A variable named with --token-env must hold one: a typo must not silently send no token.
    """
    name = token_env or fallback
    token = os.environ.get(name, "") if name else ""
    if token_env and not token:
        raise ConfigError(f"--token-env names {token_env}, which is not set (or empty)")
    return token or None


def call_fleet(method: str, server: str, path: str, *, token: str | None = None, body: dict | None = None,
               files: list | None = None, timeout: float = 30.0) -> Any:
    """One request to the fleet API, its JSON answer back; every way it can go wrong is a one-line FleetError."""
    import httpx

    from edgefn.config import HTTP_SCHEMES, HTTP_SHAPE, check_url, redact_url
    from edgefn.protocol.fleet import API

    try:
        check_url(server, HTTP_SCHEMES, HTTP_SHAPE)
    except ValueError as exc:  # else httpx's InvalidURL, which is no HTTPError
        raise ConfigError(f"--server {redact_url(server)}: {exc}") from None
    url = f"{server.rstrip('/')}{API}{path}"
    shown, server = redact_url(url), redact_url(server)  # what the errors say; `url` keeps a user:password to log in
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        response = httpx.request(method, url, json=body, files=files, headers=headers, timeout=timeout)
    except httpx.HTTPError as exc:
        raise FleetError(f"cannot reach the fleet server at {server}: {exc or type(exc).__name__}") from None
    try:
        doc = response.json()
    except ValueError:
        doc = None
    if response.status_code >= 400:
        detail = doc.get("error") if isinstance(doc, dict) else None
        raise FleetError(f"{method} {shown}: HTTP {response.status_code}: "
                         f"{detail or response.text.strip()[:200] or response.reason_phrase}",
                         status=response.status_code)
    if doc is None:
        raise FleetError(f"{method} {shown}: the answer is not JSON (is this a fleet server?)")
    return doc
