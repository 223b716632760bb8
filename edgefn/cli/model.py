"""`edgefn model ...`: make variants of a model, look inside a model, time its variants here."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich import box
from rich.markup import escape
from rich.table import Table

from edgefn.cli._toolkit import cli_errors, console, format_ms, format_size, out, print_json
from edgefn.errors import ModelError

if TYPE_CHECKING:
    from edgefn.inference.evaluate import Samples
    from edgefn.inference.model import ModelInfo, TensorSpec
    from edgefn.inference.optimize import Outcome

model_app = typer.Typer(help="Make, inspect and time model variants (int8, pruned, TFLite).", no_args_is_help=True)

MODELS_HELP = "Folder of model folders, to find NAME in."


# --- optimize -------------------------------------------------------------------------------------


@model_app.command("optimize")
def optimize(
    src: Annotated[Path, typer.Argument(help="The float ONNX model to make variants of.")],
    validation: Annotated[Path, typer.Option(help=".npz with 'x' (inputs) and 'y' (labels): every variant is "
                                                  "evaluated on it.")],
    calibration: Annotated[Path | None, typer.Option(help=".npz with 'x' (inputs) to calibrate int8 on, and 'y' "
                                                          "(labels) to choose per-channel or per-tensor scales.")] = None,
    quantize: Annotated[str | None, typer.Option(help="Make an int8 variant (static quantization, QDQ).",
                                                 metavar="int8")] = None,
    prune: Annotated[float | None, typer.Option(help="Make a variant with this fraction of each weight matrix "
                                                     "zeroed (magnitude pruning), e.g. 0.5.")] = None,
    prune_scope: Annotated[str, typer.Option(help="global: one magnitude threshold for all weights (small, critical "
                                                  "layers keep more); layer: each weight tensor pruned alike.",
                                             metavar="global|layer")] = "global",
    max_drop: Annotated[float, typer.Option(help="Refuse a variant whose accuracy falls more than this below the "
                                                 "float model's (0.01: one point).")] = 0.01,
    out_dir: Annotated[Path | None, typer.Option("--out", help="Folder whose model.json registers the variants "
                                                               "(default: SRC's folder).")] = None,
) -> None:
    """Make int8 and/or pruned variants of a float ONNX model, keep those within --max-drop of its accuracy.

    With --quantize and --prune both, three variants: int8, pruned<NN> and pruned<NN>-int8. Kept variants
    are written beside model.json and registered in it; refused ones leave nothing behind.
    Exit code 0 when every variant asked for was registered, 1 when any was refused, 2 on an error.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from edgefn.inference import optimize as opt
    from edgefn.inference.evaluate import Samples

    with cli_errors():
        planned = opt.plan(quantize, prune)
        val = Samples.load(validation)
        cal = Samples.load(calibration, labels=False) if calibration is not None else None
        columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn())
        with Progress(*columns, console=console, transient=True, disable=not console.is_terminal) as bar:
            task, done = bar.add_task("starting", total=opt.steps(planned)), itertools.count()
            outcomes = opt.optimize(src, cal, val, quantize=quantize, prune_to=prune, prune_scope=prune_scope,
                                    max_drop=max_drop, out=out_dir,
                                    progress=lambda what: bar.update(task, description=what, completed=next(done)))
    _print_outcomes(outcomes, max_drop, out_dir or src.parent)
    raise typer.Exit(0 if all(o.registered for o in outcomes) else 1)


def _outcome_table(outcomes: list[Outcome], max_drop: float, folder: Path) -> Table:
    table = Table(title=f"variants of {outcomes[0].file} in {folder}/", box=box.SIMPLE, pad_edge=False,
                  collapse_padding=True,
                  caption=f"acc: accuracy; drop: points below the float model's (at most {max_drop * 100:g}); "
                          "b1, b16: median latency of a batch of 1, 16 (one thread)")
    table.add_column("variant", no_wrap=True, min_width=max(len(o.variant) for o in outcomes))
    for column in ("size", "gzip", "acc", "drop", "b1", "b16"):
        table.add_column(column, justify="right", no_wrap=True)
    table.add_column("", no_wrap=True, min_width=len("registered"))
    for o in outcomes:
        table.add_row(o.variant, format_size(o.size), format_size(o.gzip_size), f"{o.accuracy:.4f}",
                      "" if o is outcomes[0] else f"{o.drop * 100:.2f}", *(format_ms(lat.median_ms) for lat in o.latency),
                      "" if o is outcomes[0] else "[green]registered[/]" if o.registered else "[red]refused[/]")
    return table


def _print_outcomes(outcomes: list[Outcome], max_drop: float, folder: Path) -> None:
    out.print(_outcome_table(outcomes, max_drop, folder))
    for o in outcomes[1:]:
        verdict = "registered" if o.registered else "refused"
        out.print(f"{o.variant}: {verdict} ({o.file}): {escape(o.note)}" if o.registered
                     else f"{o.variant}: {verdict}: {escape(o.note)}", highlight=False)


# --- inspect --------------------------------------------------------------------------------------


def _find(target: str, models: Path) -> tuple[ModelInfo | None, Path | None]:
    """(the model, None) for a model folder, a model.json or a model's name under `models`; (None, the file)
    for a model file."""
    from edgefn.inference.model import ModelInfo
    from edgefn.inference.registry import ModelRegistry

    path = Path(target)
    if path.is_dir():
        return ModelInfo.read(path), None
    if path.name == "model.json" and path.is_file():
        return ModelInfo.read(path.parent), None
    if path.is_file():
        return None, path
    if not models.is_dir():
        raise ModelError(f"{target}: no such file or folder, and no models folder {models} to find it in")
    return ModelRegistry([models], verify=False).info(target), None


def _spec_table(title: str, specs: list[TensorSpec]) -> Table:
    table = Table(title=title, title_justify="left")
    for column in ("name", "dtype", "shape"):
        table.add_column(column)
    for spec in specs:
        table.add_row(spec.name, spec.dtype, escape(spec.describe().split(" ", 1)[1]))
    return table


def _sha_state(path: Path, sha256: str | None) -> str:
    from edgefn.files import file_sha256

    if not path.is_file():
        return "[red]missing[/]"
    if file_sha256(path) == sha256:
        return "[green]ok[/]"
    return "[red]mismatch[/]"


@model_app.command("inspect")
def inspect(
    target: Annotated[str, typer.Argument(help="A model folder, its model.json, a .onnx/.tflite file, or a model's "
                                               "name.", metavar="PATH|NAME")],
    models: Annotated[Path, typer.Option(help=MODELS_HELP)] = Path("models"),
) -> None:
    """Show a model's inputs, outputs and variants (size, accuracy, sha256 check), and the variant chosen here."""
    from edgefn.inference.backends import BACKENDS
    from edgefn.inference.choice import choose

    with cli_errors():
        info, file = _find(target, models)
        if file is not None:
            backend = BACKENDS.get(file.suffix.lstrip("."))
            if backend is None:
                raise ModelError(f"{file}: not a model file (.onnx or .tflite), a model folder or a model's name")
            loaded = backend(file)
            out.print(f"[bold]{file}[/] ({loaded.format}, {format_size(file.stat().st_size)})")
            out.print(_spec_table("inputs", loaded.inputs))
            out.print("outputs: " + ", ".join(loaded.outputs))
            return
        out.print(f"[bold]{info.name}[/] ({info.folder})")
        out.print(_spec_table("inputs", list(info.inputs)))
        out.print(_spec_table("outputs", list(info.outputs)))
        table = Table(title="variants", title_justify="left", box=box.SIMPLE)
        for column in ("variant", "format", "precision", "sparsity", "size", "accuracy", "sha256"):
            table.add_column(column)
        for v in info.variants:
            table.add_row(v.name, v.format, v.precision, f"{v.sparsity:.0%}" if v.sparsity else "-",
                          format_size(v.size) if v.size else "?", f"{v.accuracy:.4f}" if v.accuracy else "?",
                          _sha_state(info.path(v), v.sha256))
        out.print(table)
        try:
            _, choice = choose(info)
        except ModelError as exc:
            out.print(f"[red]runs here as: nothing[/] ({escape(str(exc))})")
            return
        out.print(f"runs here as: [bold]{choice.variant}[/] ({choice.format}, {choice.delegate})")
        for variant, why in choice.passed_over:
            out.print(f"  passed over {variant}: {escape(why)}", highlight=False)


# --- bench ----------------------------------------------------------------------------------------


@model_app.command("bench")
def bench(
    name: Annotated[str, typer.Argument(help="The model's name (its folder under --models) or its folder.")],
    variant: Annotated[list[str] | None, typer.Option(help="Time only this variant (repeatable).")] = None,
    models: Annotated[Path, typer.Option(help=MODELS_HELP)] = Path("models"),
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    record: Annotated[bool, typer.Option(help="Keep the medians in the state dir: the daemon then runs the "
                                              "fastest variant here by default.")] = True,
    state_dir: Annotated[Path | None, typer.Option(help="The daemon's state dir (default: $XDG_STATE_HOME/edgefn, "
                                                        "else ~/.local/state/edgefn).")] = None,
) -> None:
    """Time every variant of a model that runs here: latency at batch 1 and 16 (median and p99, one thread).

    Inputs are the model's validation.npz where it has one (then accuracy is shown too), else random
    inputs of its input shape. A variant that cannot run here is listed with the reason. The table marks
    the fastest variant and the one a daemon runs by default; with --record (the default) the medians
    are kept, and the default becomes the fastest (a --model-variant pin still wins).
    """
    from edgefn.config import default_state_dir
    from edgefn.inference.backends import open_variant
    from edgefn.inference.evaluate import accuracy, measure_latency
    from edgefn.inference.measured import LATENCY_FILE
    from edgefn.inference.measured import record as record_latencies

    with cli_errors():
        info, file = _find(name, models)
        if info is None:
            raise ModelError(f"{file}: give a model's name or folder (with model.json), not a file")
        samples = _samples_for(info)
        rows = []
        for v in [info.variant(n) for n in variant] if variant else info.variants:
            row: dict = {"variant": v.name, "format": v.format, "precision": v.precision, "sparsity": v.sparsity}
            try:
                backend = open_variant(info, v)
            except ModelError as exc:
                if variant:
                    raise
                rows.append({**row, "skipped": str(exc)})
                continue
            row["accuracy"] = accuracy(backend, samples) if samples.y is not None else None
            row["latency"] = [measure_latency(backend, samples, b).to_json() for b in (1, 16)]
            rows.append(row)
        medians = {row["variant"]: row["latency"][0]["median_ms"] for row in rows if "latency" in row}
        latency_file = (state_dir or default_state_dir()) / LATENCY_FILE
        before = _default_variant(info, latency_file)
        if record and medians:
            record_latencies(latency_file, info, medians)
        in_use = _default_variant(info, latency_file)
    fastest = min(medians, key=medians.__getitem__) if medians else None
    if as_json:
        print_json({"model": info.name, "folder": str(info.folder), "variants": rows, "fastest": fastest,
                    "in_use": in_use, "was_in_use": before, "recorded": str(latency_file) if record else None})
        return
    out.print(_bench_table(info.name, rows, fastest, in_use))
    for row in rows:
        if "skipped" in row:
            out.print(f"{row['variant']}: cannot run here: {escape(row['skipped'])}", highlight=False)
    if fastest is None:
        return
    out.print(f"fastest here: {fastest} ({format_ms(medians[fastest])} at batch 1)", highlight=False)
    if record:
        changed = f" (was {before})" if before != in_use else ""
        out.print(f"recorded in {escape(str(latency_file))}: a daemon with this state dir runs {info.name} as "
                  f"{in_use}{changed}; pin another with --model-variant {info.name}=NAME", highlight=False)
    elif in_use != fastest:
        out.print(f"in use: {in_use}; to run the fastest: --model-variant {info.name}={fastest}, or bench with "
                  "--record", highlight=False)


def _default_variant(info: ModelInfo, latency_file: Path) -> str | None:
    """The variant a daemon runs by default here (this device's profile, the latencies recorded)."""
    from edgefn.errors import ProfileError
    from edgefn.inference.choice import DEFAULT_PRECISIONS, choose
    from edgefn.inference.measured import recorded
    from edgefn.profiles.detect import detect

    try:
        profile = detect().profile
        precisions, cpu_precisions = profile.variant_preference, profile.cpu_variant_preference
    except ProfileError:
        precisions = cpu_precisions = list(DEFAULT_PRECISIONS)
    try:
        _, choice = choose(info, precisions=precisions, latencies=recorded(latency_file, info),
                           cpu_precisions=cpu_precisions)
    except ModelError:
        return None
    return choice.variant


def _samples_for(info: ModelInfo) -> Samples:
    """The model's validation samples where it ships them, else seeded random inputs of its first input's shape."""
    import numpy as np

    from edgefn.inference.evaluate import Samples

    shipped = info.folder / "validation.npz"
    if shipped.is_file():
        return Samples.load(shipped)
    spec = info.inputs[0]
    shape = (16, *(d if d > 0 else 1 for d in spec.shape[1:]))
    return Samples(np.random.default_rng(0).random(shape).astype(spec.dtype), None)


def _bench_table(model: str, rows: list[dict], fastest: str | None, in_use: str | None) -> Table:
    table = Table(title=f"{model}: latency per call here (one thread)", box=box.SIMPLE, pad_edge=False,
                  collapse_padding=True)
    for column in ("variant", "format", "accuracy", "b1 median", "b1 p99", "b16 median", "b16 p99", ""):
        table.add_column(column, justify="left" if column in ("variant", "format") else "right", no_wrap=True)
    for row in rows:
        if "skipped" in row:
            table.add_row(row["variant"], row["format"], "[yellow]cannot run here[/]")
            continue
        acc = f"{row['accuracy']:.4f}" if row["accuracy"] is not None else "-"
        lat = [format_ms(lat[k]) for lat in row["latency"] for k in ("median_ms", "p99_ms")]
        marks = ", ".join(m for m, v in (("in use", in_use), ("fastest", fastest)) if v == row["variant"])
        table.add_row(row["variant"], row["format"], acc, *lat, marks)
    return table
