"""`edgefn model optimize` and friends on a private copy of the digits model: variants within their
bounds are registered, a variant past --max-drop is refused and leaves nothing behind."""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from sklearn.datasets import load_digits
from typer.testing import CliRunner

from edgefn.cli.main import app
from edgefn.errors import ModelError
from edgefn.inference.backends import open_variant
from edgefn.inference.backends.onnx import OnnxBackend
from edgefn.inference.evaluate import Samples, accuracy, predict
from edgefn.inference.model import ModelInfo
from edgefn.inference.optimize import optimize, plan, prune
from edgefn.inference.registry import ModelRegistry
from tests.conftest import MODELS

runner = CliRunner(env={"COLUMNS": "400"})
DIGITS = MODELS / "digits"


def write_samples(folder: Path) -> tuple[Path, Path]:
    """calibration.npz (200 seeded training images) and validation.npz (images 1400..1796), as the
    model build scripts write them."""
    x, y = load_digits(return_X_y=True)
    x, y = x.astype(np.float32), y.astype(np.int64)
    rows = np.sort(np.random.default_rng(0).choice(1400, 200, replace=False))
    np.savez(folder / "calibration.npz", x=x[rows], y=y[rows])
    np.savez(folder / "validation.npz", x=x[1400:], y=y[1400:])
    return folder / "calibration.npz", folder / "validation.npz"


def float_only_copy(dest: Path) -> Path:
    """models/digits with only its float ONNX variant, as build.py makes it."""
    dest.mkdir(parents=True)
    meta = json.loads((DIGITS / "model.json").read_text())
    meta["variants"] = [v for v in meta["variants"] if v["name"] == "fp32"]
    (dest / "model.json").write_text(json.dumps(meta, indent=2))
    shutil.copyfile(DIGITS / "model.onnx", dest / "model.onnx")
    return dest


@pytest.fixture(scope="module")
def optimized(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list]:
    """A copy of digits optimized with --quantize int8 --prune 0.5 --max-drop 0.02, and the outcomes."""
    folder = float_only_copy(tmp_path_factory.mktemp("models") / "digits")
    calibration, validation = write_samples(folder)
    outcomes = optimize(folder / "model.onnx", Samples.load(calibration), Samples.load(validation),
                        quantize="int8", prune_to=0.5, max_drop=0.02)
    return folder, outcomes


def test_optimize_registers_int8_and_pruned_int8_within_bounds(optimized):
    folder, outcomes = optimized
    by_name = {o.variant: o for o in outcomes}
    assert list(by_name) == ["fp32", "int8", "pruned50", "pruned50-int8"]
    assert all(o.registered for o in outcomes), [o.note for o in outcomes]
    assert by_name["int8"].drop <= 0.01
    assert by_name["pruned50-int8"].drop <= 0.02
    assert by_name["int8"].size < by_name["fp32"].size * 0.6  # int8 weights: about a quarter, plus scales
    assert by_name["pruned50"].size == pytest.approx(by_name["fp32"].size, rel=0.01)  # zeros are still stored
    assert by_name["pruned50"].gzip_size < by_name["fp32"].gzip_size  # ... but compress
    for o in outcomes:
        assert [lat.batch for lat in o.latency] == [1, 16]
        assert all(0 < lat.median_ms <= lat.p99_ms for lat in o.latency)


def test_optimize_writes_true_metadata(optimized):
    folder, outcomes = optimized
    info = ModelInfo.read(folder)
    assert info.variant_names() == ["fp32", "int8", "pruned50", "pruned50-int8"]
    validation = Samples.load(folder / "validation.npz")
    for v in info.variants[1:]:
        raw = info.path(v).read_bytes()
        assert v.file == f"model.{v.name}.onnx"
        assert (v.size, v.sha256) == (len(raw), hashlib.sha256(raw).hexdigest())
        assert v.made_by == "edgefn model optimize"
        assert (v.precision, v.sparsity) == (("int8" if v.name.endswith("int8") else "fp32"),
                                             (0.5 if v.name.startswith("pruned") else 0.0))
        assert accuracy(open_variant(info, v), validation) == pytest.approx(v.accuracy, abs=1e-4)
    assert info.meta["dataset"] == "sklearn.datasets.load_digits"  # the rest of model.json is kept


def test_int8_labels_agree_with_the_float_model(optimized):
    folder, _ = optimized
    validation = Samples.load(folder / "validation.npz")
    fp32 = predict(OnnxBackend(folder / "model.onnx"), validation)
    int8 = predict(OnnxBackend(folder / "model.int8.onnx"), validation)
    assert (fp32 == int8).mean() >= 0.99


WEIGHTS = ("coefficient", "coefficient1")  # the two MatMul weights of digits; the rest are biases and constants


def pruned_digits(scope: str) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The initializers of digits before and after pruning half its weights with this scope."""
    model = onnx.load(DIGITS / "model.onnx")
    before = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    assert prune(model, 0.5, scope) == 2
    after = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for name in set(before) - set(WEIGHTS):
        assert np.array_equal(before[name], after[name]), name
    scaler = next(n for n in model.graph.node if n.op_type == "Scaler")
    assert scaler == next(n for n in onnx.load(DIGITS / "model.onnx").graph.node if n.op_type == "Scaler")
    return before, after


def smallest_went_first(before: list[np.ndarray], after: list[np.ndarray]) -> bool:
    w, pruned = np.concatenate([b.ravel() for b in before]), np.concatenate([a.ravel() for a in after])
    kept = pruned != 0
    return np.array_equal(pruned[kept], w[kept]) and np.abs(w[~kept]).max() <= np.abs(w[kept]).min()


def test_prune_each_layer_zeros_half_of_every_weight_matrix():
    before, after = pruned_digits("layer")
    for name in WEIGHTS:
        assert (after[name] == 0).mean() == pytest.approx(0.5, abs=1 / before[name].size)
        assert smallest_went_first([before[name]], [after[name]])


def test_prune_globally_zeros_half_of_all_weights_smallest_first():
    before, after = pruned_digits("global")
    zeros = sum(int((after[n] == 0).sum()) for n in WEIGHTS)
    assert zeros == round(0.5 * sum(before[n].size for n in WEIGHTS))
    assert smallest_went_first([before[n] for n in WEIGHTS], [after[n] for n in WEIGHTS])
    assert (after["coefficient1"] == 0).mean() < 0.45  # the small classifier layer keeps more


def test_optimize_without_onnx_names_the_extra(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setitem(sys.modules, "onnx", None)
    _, validation = write_samples(tmp_path)
    with pytest.raises(ModelError, match=r"needs the onnx package: pip install 'edgefn\[models\]'"):
        optimize(DIGITS / "model.onnx", None, Samples.load(validation), quantize=None, prune_to=0.5)


def test_plan_names_the_variants_and_refuses_nonsense():
    assert [p.name for p in plan("int8", 0.5)] == ["int8", "pruned50", "pruned50-int8"]
    assert [p.name for p in plan(None, 0.75)] == ["pruned75"]
    for quantize, fraction, message in (("int4", None, "unknown quantization"), (None, 1.5, "between 0 and 1"),
                                        (None, None, "nothing to make")):
        with pytest.raises(ModelError, match=message):
            plan(quantize, fraction)
    with pytest.raises(ModelError, match=r"unknown pruning scope 'row' \(known: global, layer\)"):
        prune(onnx.load(DIGITS / "model.onnx"), 0.5, "row")


def test_registry_runs_the_optimized_int8_and_says_why(optimized):
    folder, _ = optimized
    choice = ModelRegistry([folder.parent]).choice("digits")
    assert (choice.variant, choice.format, choice.delegate) == ("int8", "onnx", "cpu")
    assert dict(choice.passed_over) == {"pruned50-int8": "ranked below int8: dense before pruned",
                                        "fp32": "ranked below int8: int8 before fp32",
                                        "pruned50": "ranked below int8: int8 before fp32"}


# --- the command line -----------------------------------------------------------------------------


@pytest.mark.parametrize("command", [["model"], ["model", "optimize"], ["model", "inspect"], ["model", "bench"]],
                         ids=" ".join)
def test_help_every_model_command(command: list[str]):
    result = runner.invoke(app, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output


def row_of(output: str, variant: str) -> list[str]:
    """The cells of a variant's row in a printed table."""
    return next(cells for cells in (line.split() for line in output.splitlines()) if cells[:1] == [variant])


def test_cli_optimize_registers_and_prints_a_table(tmp_path: Path):
    folder = float_only_copy(tmp_path / "digits")
    calibration, validation = write_samples(tmp_path)
    result = runner.invoke(app, ["model", "optimize", str(folder / "model.onnx"), "--calibration", str(calibration),
                                 "--validation", str(validation), "--quantize", "int8"])
    assert result.exit_code == 0, result.output
    row = row_of(result.output, "int8")
    assert row[-1] == "registered" and "kB" in row and "µs" in row
    assert "int8: registered (model.int8.onnx): per-" in result.output
    assert ModelInfo.read(folder).variant_names() == ["fp32", "int8"]


def test_cli_optimize_refusal_leaves_nothing_behind(tmp_path: Path):
    folder = float_only_copy(tmp_path / "digits")
    calibration, validation = write_samples(tmp_path)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    result = runner.invoke(app, ["model", "optimize", str(folder / "model.onnx"), "--calibration", str(calibration),
                                 "--validation", str(validation), "--prune", "0.95", "--prune-scope", "layer",
                                 "--max-drop", "0.001"])
    assert result.exit_code == 1, result.output
    assert row_of(result.output, "pruned95")[-1] == "refused"
    assert "pruned95: refused: accuracy 0." in result.output and "points below the float model's" in result.output
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_cli_optimize_into_a_new_folder_writes_model_json(tmp_path: Path):
    calibration, validation = write_samples(tmp_path)
    result = runner.invoke(app, ["model", "optimize", str(DIGITS / "model.onnx"), "--calibration", str(calibration),
                                 "--validation", str(validation), "--quantize", "int8", "--out",
                                 str(tmp_path / "mine")])
    assert result.exit_code == 0, result.output
    info = ModelInfo.read(tmp_path / "mine")
    assert info.name == "mine" and info.variant_names() == ["fp32", "int8"]
    assert [(s.name, s.dtype, s.shape) for s in info.inputs] == [("pixels", "float32", (-1, 64))]
    assert [o.name for o in info.outputs] == ["label", "probabilities"]
    assert ModelRegistry([tmp_path]).choice("mine").variant == "int8"


@pytest.mark.parametrize(("args", "message"), [
    (["--validation", "nope.npz", "--quantize", "int8"], "nope.npz: file missing"),
    (["--quantize", "int8"], "quantizing needs calibration samples"),
    (["--quantize", "int4"], "unknown quantization 'int4'"),
    (["--prune", "0.5", "--prune-scope", "row"], "unknown pruning scope 'row'"),
    ([], "nothing to make"),
], ids=["missing-npz", "no-calibration", "int4", "scope", "nothing"])
def test_cli_optimize_errors_are_one_clean_line(tmp_path: Path, args: list[str], message: str):
    _, validation = write_samples(tmp_path)
    args = args if "--validation" in args else ["--validation", str(validation), *args]
    result = runner.invoke(app, ["model", "optimize", str(DIGITS / "model.onnx"), *args])
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: ") and message in result.output
    assert "Traceback" not in result.output


def test_cli_inspect_a_folder_a_name_and_a_file(optimized):
    folder, _ = optimized
    by_folder = runner.invoke(app, ["model", "inspect", str(folder)])
    by_name = runner.invoke(app, ["model", "inspect", "digits", "--models", str(folder.parent)])
    assert by_folder.exit_code == 0, by_folder.output
    assert by_name.output == by_folder.output
    for expected in ("pixels", "float32", "[N, 64]", "probabilities", "pruned50-int8", "runs here as: int8"):
        assert expected in by_folder.output
    assert by_folder.output.count(" ok ") >= 4
    by_file = runner.invoke(app, ["model", "inspect", str(folder / "model.int8.onnx")])
    assert by_file.exit_code == 0 and "[N, 64]" in by_file.output and "label, probabilities" in by_file.output


def test_cli_inspect_shows_a_changed_file(tmp_path: Path):
    folder = float_only_copy(tmp_path / "digits")
    (folder / "model.onnx").write_bytes((folder / "model.onnx").read_bytes()[:1000])
    result = runner.invoke(app, ["model", "inspect", str(folder)])
    assert result.exit_code == 0, result.output
    assert "mismatch" in result.output and "runs here as: nothing" in result.output
    missing = runner.invoke(app, ["model", "inspect", "nope", "--models", str(tmp_path)])
    assert missing.exit_code == 2 and "no model named 'nope'" in missing.output


def test_cli_bench_times_every_variant(optimized, tmp_path: Path):
    folder, _ = optimized
    result = runner.invoke(app, ["model", "bench", "digits", "--models", str(folder.parent), "--json",
                                 "--state-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert [v["variant"] for v in doc["variants"]] == ["fp32", "int8", "pruned50", "pruned50-int8"]
    for v in doc["variants"]:
        assert [lat["batch"] for lat in v["latency"]] == [1, 16]
        assert all(0 < lat["median_ms"] <= lat["p99_ms"] for lat in v["latency"])
        assert v["accuracy"] > 0.85
    one = runner.invoke(app, ["model", "bench", str(folder), "--variant", "int8", "--no-record"])
    assert one.exit_code == 0 and "int8" in one.output and "pruned50" not in one.output
    bad = runner.invoke(app, ["model", "bench", str(folder), "--variant", "int4"])
    assert bad.exit_code == 2 and "has no variant 'int4'" in bad.output


def test_cli_bench_lists_a_variant_that_cannot_run(optimized, tmp_path: Path):
    folder = tmp_path / "digits"
    shutil.copytree(optimized[0], folder)
    (folder / "model.int8.onnx").write_bytes(b"truncated")
    result = runner.invoke(app, ["model", "bench", str(folder), "--state-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert row_of(result.output, "int8")[-3:] == ["cannot", "run", "here"]
    assert "int8: cannot run here: " in result.output and "sha256 does not match" in result.output
    assert "µs" in " ".join(row_of(result.output, "fp32"))
