"""Which variant of a model runs here, and on which delegate: the preference among variants, the
choice itself (the first that opens), and why each other one was passed over (`Choice`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from edgefn.errors import ModelError
from edgefn.inference.backends import BACKENDS, open_variant, read_variant
from edgefn.inference.backends.base import Backend
from edgefn.inference.delegates import DEFAULT_CHAINS, Delegate
from edgefn.inference.model import ModelInfo, Variant

# The default preference (a device profile can give another order of precisions), "int8 on CPU":
# 1. int8 before fp32: on the CPUs of edge boards (Cortex-A, x86 with VNNI) int8 kernels are faster and
#    the file is a quarter of the size; `edgefn model optimize` registers no variant that lost more
#    than its --max-drop. (On a tiny model and a desktop CPU int8 can be slower; pin fp32 there.)
# 2. dense before pruned, least sparse first: neither onnxruntime nor LiteRT has sparse CPU kernels for
#    these ops, so zeroed weights save no time and no memory at run time (only bytes in a compressed
#    download), while they cost some accuracy. A pruned variant runs when no dense one of its
#    precision can.
# 3. ONNX before TFLite: onnxruntime is always installed, and it is the runtime the benchmarks measure.
# 4. higher validation accuracy first; then the order of model.json.
# Where latencies were measured on this device (`edgefn model bench`, edgefn.inference.measured), they
# come first: the measured variants, fastest first, then the others in the order above. Precision is a
# guess at speed; a measurement is not (digits here: int8 ONNX 19 µs, the slowest; TFLite fp32 9 µs).
DEFAULT_PRECISIONS = ("int8", "fp16", "fp32")
_FORMAT_RANK = {"onnx": 0, "tflite": 1}


def preference(variant: Variant, precisions: Sequence[str] = DEFAULT_PRECISIONS) -> tuple:
    """Sort key: the earlier in `precisions` (a device profile's order), dense, ONNX, more accurate."""
    precision = "int8" if variant.precision == "uint8" else variant.precision
    rank = precisions.index(precision) if precision in precisions else len(precisions)
    return (rank, variant.sparsity, _FORMAT_RANK.get(variant.format, 2), -(variant.accuracy or 0.0))


def _ranked_below(loser: Variant, winner: Variant, latencies: Mapping[str, float] | None = None) -> str:
    """Why `loser` comes after `winner` in the preference, in words."""
    latencies = latencies or {}
    if winner.name in latencies:
        if loser.name not in latencies:
            return f"not measured here, and {winner.name} was ({_ms(latencies[winner.name])})"
        return f"slower here: {_ms(latencies[loser.name])} against {_ms(latencies[winner.name])} (edgefn model bench)"
    if loser.precision != winner.precision:
        return f"{winner.precision} before {loser.precision}"
    if loser.sparsity != winner.sparsity:
        return "dense before pruned" if winner.sparsity == 0 else "less sparse first"
    if loser.format != winner.format:
        return f"{winner.format} before {loser.format}"
    if loser.accuracy != winner.accuracy:
        return f"higher accuracy first ({winner.accuracy} > {loser.accuracy})"
    return "listed later in model.json"


def _ms(ms: float) -> str:
    return f"{ms * 1000:.0f} µs" if ms < 1 else f"{ms:.2f} ms"


def ranked(variants: Sequence[Variant], precisions: Sequence[str] = DEFAULT_PRECISIONS,
           latencies: Mapping[str, float] | None = None) -> list[Variant]:
    """The variants in the order they are tried: measured ones fastest first, then by `preference`."""
    latencies = latencies or {}
    return sorted(variants, key=lambda v: (v.name not in latencies, latencies.get(v.name, 0.0),
                                           preference(v, precisions)))


@dataclass(frozen=True)
class Choice:
    """The variant and delegate a model runs on here, and why each other one was passed over."""

    model: str
    variant: str
    format: str
    delegate: str
    # (what, reason), best-ranked first; `what` is a variant, or `variant@delegate` for what failed
    # on one delegate only.
    passed_over: tuple[tuple[str, str], ...]


def choose(info: ModelInfo, pinned: str | None = None, verify: bool = True,
           chains: Mapping[str, Sequence[Delegate]] | None = None,
           precisions: Sequence[str] = DEFAULT_PRECISIONS, search: Sequence[Path] = (),
           latencies: Mapping[str, float] | None = None,
           cpu_precisions: Sequence[str] | None = None) -> tuple[Backend, Choice]:
    """Open the best (variant, delegate) that runs here and say why the others were not used.

    `chains` is the device profile's delegate chain per format. Accelerated delegates are tried
    first, each with the variants it can run in the order of `precisions`; then the CPU delegates
    the same way, in the order of `cpu_precisions` (default: `precisions`); `latencies` (variant -> median
    ms measured here) put the measured variants first, fastest first. A pinned variant is the only one tried
    (on each delegate of its chain)."""
    chains = chains or DEFAULT_CHAINS
    order = [info.variant(pinned)] if pinned is not None else ranked(info.variants, precisions, latencies)
    # A GPU's order is not the CPU's: with no GPU provider at hand, the CPU runs what is fastest on a CPU.
    cpu_order = order if pinned is not None or cpu_precisions is None else ranked(info.variants, cpu_precisions,
                                                                                 latencies)
    # Delegates that run only a variant made for them (an Edge TPU's compiled file) the model lacks.
    missing = [(f"{d.requires_variant}@{d.name}", f"{d.name} runs only a {d.requires_variant} variant, and "
                f"model {info.name} has none")
               for chain in chains.values() for d in chain
               if d.requires_variant is not None and d.requires_variant not in info.variant_names()]
    attempts: list[tuple[Variant, Delegate | None]] = []
    for accelerated in (True, False):
        for variant in order if accelerated else cpu_order:
            if variant.format not in BACKENDS or not chains.get(variant.format):
                if not accelerated:
                    attempts.append((variant, None))  # open_variant (or the loop below) says why
                continue
            attempts += [(variant, d) for d in chains[variant.format]
                         if d.accelerated == accelerated and d.requires_variant in (None, variant.name)]
    failures: dict[str, list[tuple[str, str]]] = {v.name: [] for v in order}
    files: dict[str, bytes | ModelError] = {}  # each file read and hashed once, whatever the delegates tried
    for variant, delegate in attempts:
        try:
            if delegate is None and variant.format in BACKENDS:
                raise ModelError(f"the device profile has no delegate for {variant.format}")
            if variant.format in BACKENDS and variant.name not in files:
                try:
                    files[variant.name] = read_variant(info, variant, verify)
                except ModelError as exc:
                    files[variant.name] = exc
            content = files.get(variant.name)
            if isinstance(content, ModelError):
                raise content
            backend = open_variant(info, variant, verify, delegate, search, content)
        except ModelError as exc:
            failures[variant.name].append((delegate.name if delegate else "-", str(exc)))
            continue
        passed = missing + _passed_over(order, variant, failures, attempts, latencies)
        if pinned is not None:
            passed += [(v.name, f"not pinned (pinned: {pinned})") for v in info.variants if v.name != pinned]
        return backend, Choice(info.name, variant.name, variant.format, backend.delegate, tuple(passed))
    if pinned is not None:
        reasons = "; ".join(f"{why}" for _, why in _passed_over(order, None, failures, attempts))
        raise ModelError(f"model {info.name}: pinned variant {pinned} cannot run here: {reasons}")
    reasons = "; ".join(f"{what}: {why}" for what, why in missing + _passed_over(order, None, failures, attempts))
    raise ModelError(f"model {info.name}: no variant can run here: {reasons}")


def _passed_over(order: Sequence[Variant], winner: Variant | None, failures: Mapping[str, list[tuple[str, str]]],
                 attempts: Sequence[tuple[Variant, Delegate | None]],
                 latencies: Mapping[str, float] | None = None) -> list[tuple[str, str]]:
    """Per variant: one reason where every delegate it was tried on failed alike (or it was not reached),
    else a reason per delegate."""
    out: list[tuple[str, str]] = []
    for variant in order:
        failed = failures[variant.name]
        tried_all = len(failed) == sum(1 for v, _ in attempts if v is variant)
        if variant is not winner and failed and tried_all and len({why for _, why in failed}) == 1:
            out.append((variant.name, failed[0][1]))
            continue
        out += [(f"{variant.name}@{delegate}", why) for delegate, why in failed]
        if variant is not winner and winner is not None and not tried_all:
            out.append((variant.name, f"ranked below {winner.name}: {_ranked_below(variant, winner, latencies)}"))
    return out
