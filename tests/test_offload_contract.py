"""How a local model meets the endpoint's (`edgefn.offload.contract`): names from the local model.json,
the endpoint's metadata only a check, answers fitted to the local outputs as real servers write them;
and the hand-off's status and log (`edgefn.offload.status`)."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from edgefn.errors import CloudError, CloudUnavailable, ConfigError
from edgefn.inference.model import ModelInfo
from edgefn.offload.contract import Plan, Route, conform, parse_routes, plan
from edgefn.offload.status import HandoffStatus
from edgefn.protocol import oip
from tests.conftest import MODELS

DIGITS = ModelInfo.read(MODELS / "digits")
LABEL, PROBABILITIES = DIGITS.outputs


def test_routes_rename_the_model_and_its_tensors():
    routes = parse_routes({"digits": "digits-sk,label=predict,probabilities=predict_proba", "cnn": "cnn-v2"})
    assert routes["digits"] == Route("digits-sk", {"label": "predict", "probabilities": "predict_proba"})
    assert routes["digits"].there("pixels") == "pixels"
    assert routes["cnn"] == Route("cnn-v2", {})
    for bad in ("", "x,label", "x,=y", "x,label="):
        with pytest.raises(ConfigError, match="TENSOR=NAME"):
            parse_routes({"digits": bad})


@pytest.mark.parametrize("metadata", [{"inputs": [], "outputs": []}, {}, None], ids=["empty", "absent", "none"])
def test_metadata_that_lists_nothing_leaves_the_local_contract(metadata):
    """MLServer's metadata of a model whose settings declare no tensors: the local model.json decides."""
    settled = plan(Route("digits-onnx"), DIGITS, metadata)
    assert settled == Plan("digits-onnx", ("pixels",), (("label", LABEL), ("probabilities", PROBABILITIES)))


def test_declared_metadata_that_agrees_passes_and_one_that_does_not_is_named():
    declared = {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [-1, 64]}],
                "outputs": [{"name": "label", "datatype": "INT64", "shape": [-1, 1]},
                            {"name": "probabilities", "datatype": "FP64", "shape": [-1, 10]}]}
    assert plan(Route("digits"), DIGITS, declared).inputs == ("pixels",)
    wrong = {"inputs": [{"name": "pixels", "datatype": "FP64", "shape": [-1, 65]},
                        {"name": "mask", "datatype": "FP32", "shape": [-1]}],
             "outputs": [{"name": "label", "datatype": "FP32", "shape": [-1]}]}
    with pytest.raises(CloudError) as refused:
        plan(Route("digits"), DIGITS, wrong)
    text = str(refused.value)
    assert refused.value.reason == "mismatch"
    for part in ("input pixels is FP64 there, FP32 here", "shape [-1, 65] there, [-1, 64] here",
                 "takes inputs the local model has not: mask", "no output probabilities",
                 "output label is FP32 there, INT64 here"):
        assert part in text


def test_without_a_local_model_the_metadata_names_the_inputs():
    assert plan(Route("x"), None, {"inputs": [{"name": "a"}, {"name": "b"}]}) == Plan("x", ("a", "b"), None)
    with pytest.raises(CloudError, match="nothing says what to send") as unknown:
        plan(Route("x"), None, {"inputs": []})
    assert unknown.value.reason == "mismatch"


def test_answers_fit_the_local_outputs_as_servers_write_them():
    settled = plan(Route("digits"), DIGITS, None)
    probabilities = np.random.default_rng(0).random((3, 10))  # FP64, as scikit-learn gives them
    label = np.array([[4], [0], [9]], dtype=np.int64)  # [N, 1], as MLServer and KServe wrap a 1-D label
    # Read by name: the answer's order does not matter, extra outputs are left out.
    got = conform(settled, {"probabilities": probabilities, "extra": np.zeros(3), "label": label})
    assert [(a.dtype, a.shape) for a in got] == [(np.dtype("int64"), (3,)), (np.dtype("float32"), (3, 10))]
    np.testing.assert_array_equal(got[0], [4, 0, 9])
    np.testing.assert_allclose(got[1], probabilities, rtol=1e-6)
    int32 = conform(settled, {"label": label.astype(np.int32), "probabilities": probabilities})
    assert int32[0].dtype == np.int64


@pytest.mark.parametrize(("answer", "problem"), [
    ({"label": np.zeros(3, np.int64)}, "has no output probabilities (it has label)"),
    ({"label": np.zeros(3, np.float32), "probabilities": np.zeros((3, 10))}, "output label is FP32"),
    ({"label": np.zeros(3, np.int64), "probabilities": np.zeros((3, 9))}, "shape [3, 9]"),
    ({"label": np.zeros((3, 2), np.int64), "probabilities": np.zeros((3, 10))}, "shape [3, 2]"),
])
def test_answers_that_cannot_fit_are_named(answer, problem):
    with pytest.raises(CloudError) as bad:
        conform(plan(Route("digits"), DIGITS, None), answer)
    assert bad.value.reason == "bad-answer"
    assert problem in str(bad.value)


def test_numpy_datatype_names_and_null_parameters_are_read_from_answers():
    entries = [{"name": "label", "datatype": "int64", "shape": [2, 1], "data": [3, 4], "parameters": None}]
    with pytest.raises(oip.ProtocolError, match="'int64' is not supported"):
        oip.read_tensors(entries, memoryview(b""), "outputs")  # the protocol's names only, by default
    ((name, array, params),) = oip.read_tensors(entries, memoryview(b""), "outputs", lenient=True)
    assert (name, array.dtype, array.shape, params) == ("label", np.dtype("<i8"), (2, 1), {})


def test_a_failing_hand_off_is_a_warning_once_per_kind_then_rate_limited(caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.INFO, logger="edgefn.offload")
    status = HandoffStatus("http://cloud:8080", log_every_s=60, clock=lambda: 1000.0)
    assert status.snapshot()["state"] == "idle"
    refused = CloudError("model digits: 404 not found", 404, "not-served")
    for _ in range(5):
        status.failed("digits", refused)
    status.failed("digits", CloudUnavailable("circuit breaker open", reason="breaker-open"))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2  # one per kind; the four repeats wait for the next minute
    assert "hand-off of digits to http://cloud:8080 failed (not-served)" in warnings[0]
    assert "404 not found" in warnings[0]
    snapshot = status.snapshot()
    assert snapshot["state"] == "failing" and snapshot["failing"] == ["digits"]
    assert snapshot["failures"] == {"not-served": 5, "breaker-open": 1}
    assert snapshot["last_error"] == {"model": "digits", "reason": "breaker-open", "error": "circuit breaker open",
                                      "at": 1000.0}
    status.succeeded("digits")
    assert status.snapshot()["state"] == "ok"
    assert "hand-off of digits to http://cloud:8080 works again" in caplog.text
