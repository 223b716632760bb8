"""The Open Inference Protocol v2 endpoint (`cloud_sync.serve`, `edgefn cloud serve`) and the edge's client
(`edgefn.offload.client.CloudClient`), on real loopback sockets with the real models: each against the other, the
endpoint against NVIDIA's tritonclient, every answer equal to local onnxruntime's."""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import IO

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException
from typer.testing import CliRunner

from cloud_sync.serve import CloudServer, start_server
from edgefn.cli.main import app
from edgefn.errors import CloudError, CloudUnavailable, ConfigError
from edgefn.inference.registry import ModelRegistry
from edgefn.inference.tensors import from_wire, to_wire
from edgefn.offload.breaker import BreakerState, CircuitBreaker
from edgefn.offload.client import CloudClient
from edgefn.protocol.oip import HEADER_LENGTH
from tests.conftest import MODELS

MODEL_NAMES = ["digits", "digits-cnn"]
runner = CliRunner(env={"COLUMNS": "400"})


@pytest.fixture(scope="module")
def server() -> Iterator[CloudServer]:
    with start_server(MODELS) as running:
        yield running


@pytest.fixture(scope="module")
def http(server: CloudServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=10) as client:
        yield client


@pytest.fixture(scope="module")
def local() -> ModelRegistry:
    """The reference: the same models run here by edgefn's registry."""
    return ModelRegistry([MODELS])


@pytest.fixture(scope="module")
def pixels() -> np.ndarray:
    return np.load(MODELS / "digits" / "validation.npz")["x"][:16].astype(np.float32)


class Recorder(httpx.HTTPTransport):
    """httpx's own transport (real sockets), keeping each request it sends."""

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[httpx.Request] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return super().handle_request(request)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def expected(local: ModelRegistry, model: str, x: np.ndarray) -> dict[str, np.ndarray]:
    backend = local.get(model)
    return dict(zip(backend.outputs, backend.run([x]), strict=True))


def infer_request(x: np.ndarray, binary: bool, **extra: object) -> tuple[bytes, dict[str, str]]:
    """A raw OIP request for the pixels input, as JSON or binary."""
    entry: dict = {"name": "pixels", "shape": list(x.shape), "datatype": "FP32"}
    if binary:
        entry["parameters"] = {"binary_data_size": x.nbytes}
    else:
        entry["data"] = x.ravel().tolist()
    head = json.dumps({"inputs": [entry], **extra}).encode()
    if not binary:
        return head, {"Content-Type": "application/json"}
    return head + x.tobytes(), {HEADER_LENGTH: str(len(head))}


def read_answer(response: httpx.Response) -> tuple[dict, dict[str, np.ndarray]]:
    """(JSON head, outputs by name) of a raw OIP answer, binary parts included."""
    length = response.headers.get(HEADER_LENGTH)
    body = response.content
    head = json.loads(body[:int(length)] if length else body)
    rest, offset, outputs = body[int(length):] if length else b"", 0, {}
    for out in head["outputs"]:
        dtype = {"FP32": "<f4", "INT64": "<i8"}[out["datatype"]]
        size = out.get("parameters", {}).get("binary_data_size")
        if size is None:
            outputs[out["name"]] = np.asarray(out["data"], dtype=dtype).reshape(out["shape"])
        else:
            outputs[out["name"]] = np.frombuffer(rest[offset:offset + size], dtype=dtype).reshape(out["shape"])
            offset += size
    assert offset == len(rest)
    return head, outputs


def assert_same(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert set(got) == set(want)
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


# --- health and metadata ---------------------------------------------------------------------------


def test_oip_health_live_and_ready(http: httpx.Client):
    for path in ("/v2/health/live", "/v2/health/ready"):
        response = http.get(path)
        assert response.status_code == 200
        assert response.content == b""


def test_oip_server_metadata(http: httpx.Client):
    doc = http.get("/v2").json()
    assert doc["name"] == "edgefn-cloud"
    assert "binary_tensor_data" in doc["extensions"]
    assert isinstance(doc["version"], str)


@pytest.mark.parametrize("model", MODEL_NAMES)
@pytest.mark.parametrize("version", ["", "/versions/1"])
def test_oip_model_metadata_and_ready(http: httpx.Client, model: str, version: str):
    doc = http.get(f"/v2/models/{model}{version}").json()
    assert doc == {"name": model, "versions": ["1"], "platform": "onnxruntime_onnx",
                   "inputs": [{"name": "pixels", "datatype": "FP32", "shape": [-1, 64]}],
                   "outputs": [{"name": "label", "datatype": "INT64", "shape": [-1]},
                               {"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]}]}
    assert http.get(f"/v2/models/{model}{version}/ready").status_code == 200


@pytest.mark.parametrize("path", ["/v2/models/nope", "/v2/models/nope/ready", "/v2/models/digits/versions/2",
                                  "/v2/models/digits/versions/2/ready"])
def test_oip_unknown_model_or_version_is_404(http: httpx.Client, path: str):
    response = http.get(path)
    assert response.status_code == 404
    assert isinstance(response.json()["error"], str)


# --- inference, raw ---------------------------------------------------------------------------------


@pytest.mark.parametrize("model", MODEL_NAMES)
@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
@pytest.mark.parametrize("batch", [1, 16])
def test_oip_infer_equals_local(http: httpx.Client, local: ModelRegistry, pixels: np.ndarray, model: str,
                                binary: bool, batch: int):
    x = pixels[:batch]
    body, headers = infer_request(x, binary, parameters={"binary_data_output": binary})
    response = http.post(f"/v2/models/{model}/versions/1/infer", content=body, headers=headers)
    assert response.status_code == 200, response.text
    assert (HEADER_LENGTH.lower() in response.headers) == binary
    head, outputs = read_answer(response)
    assert head["model_name"] == model
    assert "id" not in head
    assert [o["name"] for o in head["outputs"]] == ["label", "probabilities"]
    assert_same(outputs, expected(local, model, x))


def test_oip_infer_echoes_id(http: httpx.Client, pixels: np.ndarray):
    body, headers = infer_request(pixels[:1], False, id="event-42")
    head, _ = read_answer(http.post("/v2/models/digits/infer", content=body, headers=headers))
    assert head["id"] == "event-42"


def test_oip_infer_requested_outputs(http: httpx.Client, local: ModelRegistry, pixels: np.ndarray):
    x = pixels[:3]
    want = expected(local, "digits-cnn", x)
    body, headers = infer_request(x, True, outputs=[{"name": "probabilities"}])
    head, outputs = read_answer(http.post("/v2/models/digits-cnn/infer", content=body, headers=headers))
    assert [o["name"] for o in head["outputs"]] == ["probabilities"]
    assert_same(outputs, {"probabilities": want["probabilities"]})
    # in the order asked, one as binary data and one as JSON
    asked = [{"name": "probabilities", "parameters": {"binary_data": True}}, {"name": "label"}]
    body, headers = infer_request(x, False, outputs=asked)
    head, outputs = read_answer(http.post("/v2/models/digits-cnn/infer", content=body, headers=headers))
    assert [o["name"] for o in head["outputs"]] == ["probabilities", "label"]
    assert "data" in head["outputs"][1] and "data" not in head["outputs"][0]
    assert_same(outputs, want)


def test_oip_infer_takes_nested_data(http: httpx.Client, local: ModelRegistry, pixels: np.ndarray):
    x = pixels[:2]
    body = {"inputs": [{"name": "pixels", "shape": [2, 64], "datatype": "FP32", "data": x.tolist()}]}
    _, outputs = read_answer(http.post("/v2/models/digits/infer", json=body))
    assert_same(outputs, expected(local, "digits", x))


def pixels_entry(**override: object) -> dict:
    return {"name": "pixels", "shape": [1, 64], "datatype": "FP32", "data": [0.0] * 64, **override}


BAD_JSON_REQUESTS = {
    "wrong-shape": {"inputs": [pixels_entry(shape=[1, 63], data=[0.0] * 63)]},
    "wrong-datatype": {"inputs": [pixels_entry(datatype="FP64")]},
    "unknown-datatype": {"inputs": [pixels_entry(datatype="FLOAT")]},
    "data-count": {"inputs": [pixels_entry(data=[0.0] * 60)]},
    "strings": {"inputs": [pixels_entry(data=["a"] * 64)]},
    "ragged": {"inputs": [pixels_entry(data=[[0.0] * 64, [0.0]])]},
    "missing-input": {"inputs": []},
    "unknown-input": {"inputs": [pixels_entry(), pixels_entry(name="other")]},
    "no-inputs-key": {"id": "x"},
    "no-data": {"inputs": [{"name": "pixels", "shape": [1, 64], "datatype": "FP32"}]},
    "negative-shape": {"inputs": [pixels_entry(shape=[-1, 64])]},
    "unknown-output": {"inputs": [pixels_entry()], "outputs": [{"name": "nope"}]},
    "id-not-string": {"id": 7, "inputs": [pixels_entry()]},
}


@pytest.mark.parametrize("case", list(BAD_JSON_REQUESTS))
def test_oip_bad_request_is_400(http: httpx.Client, case: str):
    response = http.post("/v2/models/digits/infer", json=BAD_JSON_REQUESTS[case])
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert isinstance(error, str) and error


def test_oip_malformed_json_is_400(http: httpx.Client):
    for body in (b"{not json", b"[1, 2]", b"\xff\xfe", b""):
        response = http.post("/v2/models/digits/infer", content=body)
        assert response.status_code == 400, body
        assert "JSON" in response.json()["error"]


def test_oip_unknown_model_infer_is_404(http: httpx.Client):
    response = http.post("/v2/models/nope/infer", json={"inputs": [pixels_entry()]})
    assert response.status_code == 404
    assert "nope" in response.json()["error"]


def binary_request(head: dict, data: bytes, header_length: int | None = None) -> tuple[bytes, dict[str, str]]:
    text = json.dumps(head).encode()
    return text + data, {HEADER_LENGTH: str(len(text) if header_length is None else header_length)}


@pytest.mark.parametrize("case", ["size-not-shape", "extra-bytes", "too-few-bytes", "header-past-body",
                                  "header-not-int", "data-and-binary"])
def test_oip_inconsistent_binary_sizes_are_400(http: httpx.Client, case: str):
    x = np.zeros((1, 64), np.float32).tobytes()
    entry = {"name": "pixels", "shape": [1, 64], "datatype": "FP32", "parameters": {"binary_data_size": 256}}
    body, headers = {
        "size-not-shape": lambda: binary_request({"inputs": [{**entry, "parameters": {"binary_data_size": 252}}]},
                                                 x[:252]),
        "extra-bytes": lambda: binary_request({"inputs": [entry]}, x + b"\0\0\0\0"),
        "too-few-bytes": lambda: binary_request({"inputs": [entry]}, x[:128]),
        "header-past-body": lambda: binary_request({"inputs": [entry]}, x, header_length=10**6),
        "header-not-int": lambda: (binary_request({"inputs": [entry]}, x)[0], {HEADER_LENGTH: "many"}),
        "data-and-binary": lambda: binary_request({"inputs": [{**entry, "data": [0.0] * 64}]}, x),
    }[case]()
    response = http.post("/v2/models/digits/infer", content=body, headers=headers)
    assert response.status_code == 400, response.text
    assert response.json()["error"]


def broken_models(folder: Path, name: str) -> Path:
    """A models folder with the digits model under `name`, whose every variant fails its sha256 check."""
    shutil.copytree(MODELS / "digits", folder / name)
    meta = json.loads((folder / name / "model.json").read_text())
    meta["name"] = name
    for variant in meta["variants"]:
        variant["sha256"] = "0" * 64
    (folder / name / "model.json").write_text(json.dumps(meta))
    return folder


def test_oip_model_that_cannot_load_is_not_ready(tmp_path: Path):
    broken = broken_models(tmp_path / "models", "broken")
    shutil.copytree(MODELS / "digits", broken / "good")
    with start_server(broken) as running, httpx.Client(base_url=running.url) as http:
        assert http.get("/v2/health/live").status_code == 200
        assert http.get("/v2/health/ready").status_code == 400
        assert http.get("/v2/models/broken/ready").status_code == 400
        assert http.get("/v2/models/digits/ready").status_code == 200
        response = http.post("/v2/models/broken/infer", json={"inputs": [pixels_entry()]})
        assert response.status_code == 503
        assert "sha256" in response.json()["error"]


# --- tritonclient against the endpoint -----------------------------------------------------------------


@pytest.fixture(scope="module")
def triton_client(server: CloudServer) -> Iterator[triton.InferenceServerClient]:
    client = triton.InferenceServerClient(server.url.removeprefix("http://"))
    yield client
    client.close()


def test_tritonclient_health_and_metadata(triton_client: triton.InferenceServerClient):
    assert triton_client.is_server_live()
    assert triton_client.is_server_ready()
    assert triton_client.is_model_ready("digits-cnn")
    assert triton_client.is_model_ready("digits", "1")
    assert not triton_client.is_model_ready("nope")
    assert "binary_tensor_data" in triton_client.get_server_metadata()["extensions"]
    meta = triton_client.get_model_metadata("digits-cnn")
    assert meta["inputs"] == [{"name": "pixels", "datatype": "FP32", "shape": [-1, 64]}]
    with pytest.raises(InferenceServerException, match="nope"):
        triton_client.get_model_metadata("nope")


@pytest.mark.parametrize("model", MODEL_NAMES)
@pytest.mark.parametrize("binary_in", [False, True], ids=["in-json", "in-binary"])
@pytest.mark.parametrize("binary_out", [False, True], ids=["out-json", "out-binary"])
def test_tritonclient_infer_equals_local(triton_client: triton.InferenceServerClient, local: ModelRegistry,
                                         pixels: np.ndarray, model: str, binary_in: bool, binary_out: bool):
    x = pixels[:5]
    tensor = triton.InferInput("pixels", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=binary_in)
    asked = [triton.InferRequestedOutput(n, binary_data=binary_out) for n in ("label", "probabilities")]
    result = triton_client.infer(model, [tensor], outputs=asked, request_id="t-1")
    assert result.get_response()["id"] == "t-1"
    assert_same({n: result.as_numpy(n) for n in ("label", "probabilities")}, expected(local, model, x))


def test_tritonclient_sees_our_errors(triton_client: triton.InferenceServerClient):
    tensor = triton.InferInput("pixels", [1, 63], "FP32")
    tensor.set_data_from_numpy(np.zeros((1, 63), np.float32), binary_data=True)
    with pytest.raises(InferenceServerException, match="pixels"):
        triton_client.infer("digits", [tensor])


# --- our client against the endpoint ---------------------------------------------------------------------


@pytest.mark.parametrize("model", MODEL_NAMES)
@pytest.mark.parametrize("threshold", [None, 0, 1024], ids=["json", "binary", "by-size"])
def test_client_infer_equals_local(server: CloudServer, local: ModelRegistry, pixels: np.ndarray, model: str,
                                   threshold: int | None):
    recorder = Recorder()
    with CloudClient(server.url, binary_threshold=threshold, transport=recorder) as client:
        assert client.ready(model)
        for batch in (1, 16):
            x = pixels[:batch]
            got = client.infer(model, [to_wire(x)])
            want = expected(local, model, x)
            assert_same(dict(zip(want, [from_wire(t) for t in got], strict=True)), want)
            sent_binary = HEADER_LENGTH.lower() in recorder.requests[-1].headers
            assert sent_binary == (threshold is not None and x.nbytes >= threshold)


def test_client_requested_outputs_and_model_map(server: CloudServer, local: ModelRegistry, pixels: np.ndarray):
    x = pixels[:4]
    with CloudClient(server.url, model_map={"digits": "digits-cnn"}, binary_threshold=0) as client:
        got = client.infer("digits", [to_wire(x)], ["probabilities"], request_id="r-9")
    assert len(got) == 1
    np.testing.assert_array_equal(from_wire(got[0]), expected(local, "digits-cnn", x)["probabilities"])


def test_client_4xx_is_a_cloud_error_never_retried(server: CloudServer):
    recorder = Recorder()
    with CloudClient(server.url, retries=3, transport=recorder) as client:
        with pytest.raises(CloudError) as wrong_shape:
            client.infer("digits", [to_wire(np.zeros((1, 63), np.float32))])
        assert wrong_shape.value.status == 400
        assert not isinstance(wrong_shape.value, CloudUnavailable)
        assert "pixels" in str(wrong_shape.value)
        with pytest.raises(CloudError) as unknown:
            client.infer("nope", [to_wire(np.zeros((1, 64), np.float32))])
        assert unknown.value.status == 404
        assert client.breaker.state is BreakerState.CLOSED  # the endpoint answered: not its fault
        assert not client.ready("nope")
    assert [r.method for r in recorder.requests] == ["GET", "POST", "GET", "GET"]  # metadata, infer, metadata, ready


def test_client_5xx_is_retried_then_unavailable(tmp_path: Path):
    models = broken_models(tmp_path / "models", "digits")
    recorder = Recorder()
    with start_server(models) as running, \
            CloudClient(running.url, retries=2, backoff_s=0.01, transport=recorder) as client:
        assert not client.ready("digits")
        with pytest.raises(CloudUnavailable) as failure:
            client.infer("digits", [to_wire(np.zeros((1, 64), np.float32))])
    assert failure.value.status == 503
    assert [r.method for r in recorder.requests] == ["GET", "GET", "POST", "POST", "POST"]


def test_client_retries_until_a_restarted_server_answers(pixels: np.ndarray, local: ModelRegistry):
    port = free_port()
    first = start_server(MODELS, port=port)
    with CloudClient(first.url, retries=10, backoff_s=0.05, max_backoff_s=0.2) as client:
        assert client.infer("digits", [to_wire(pixels[:1])])
        first.close()
        with CloudClient(first.url, retries=0) as impatient, pytest.raises(CloudUnavailable, match="unreachable"):
            impatient.infer("digits", [to_wire(pixels[:1])])
        restarted: list[CloudServer] = []
        timer = threading.Timer(0.4, lambda: restarted.append(start_server(MODELS, port=port)))
        timer.start()
        try:
            t0 = time.monotonic()
            got = client.infer("digits", [to_wire(pixels[:2])])
            assert time.monotonic() - t0 >= 0.3
        finally:
            timer.join()
            for s in restarted:
                s.close()
    want = expected(local, "digits", pixels[:2])
    assert_same(dict(zip(want, [from_wire(t) for t in got], strict=True)), want)


def test_client_times_out_on_a_slow_endpoint_without_retrying(pixels: np.ndarray):
    recorder = Recorder()
    with start_server(MODELS, delay_ms=600) as slow, \
            CloudClient(slow.url, timeout_s=0.2, retries=3, transport=recorder) as client:
        t0 = time.monotonic()
        with pytest.raises(CloudUnavailable, match="no answer within 0.2 s"):
            client.infer("digits", [to_wire(pixels[:1])])
        assert time.monotonic() - t0 < 0.5
        assert len(recorder.requests) == 1
        assert not client.ready("digits")  # the probe times out too


def test_client_breaker_open_fails_at_once_without_a_network_call(pixels: np.ndarray):
    recorder = Recorder()
    breaker = CircuitBreaker(failure_threshold=2, cooldown_s=60)
    with CloudClient(f"http://127.0.0.1:{free_port()}", retries=0, breaker=breaker, transport=recorder) as client:
        for _ in range(2):
            with pytest.raises(CloudUnavailable, match="unreachable"):
                client.infer("digits", [to_wire(pixels[:1])])
        assert breaker.state is BreakerState.OPEN
        sent = len(recorder.requests)
        t0 = time.monotonic()
        with pytest.raises(CloudUnavailable, match="circuit breaker open"):
            client.infer("digits", [to_wire(pixels[:1])])
        assert time.monotonic() - t0 < 0.05
        assert len(recorder.requests) == sent


def test_client_half_open_trial_closes_the_breaker(server: CloudServer, pixels: np.ndarray):
    breaker = CircuitBreaker(failure_threshold=1, cooldown_s=0.2)
    dead = f"http://127.0.0.1:{free_port()}"
    with CloudClient(dead, retries=0, breaker=breaker) as down, CloudClient(server.url, breaker=breaker) as up:
        with pytest.raises(CloudUnavailable):
            down.infer("digits", [to_wire(pixels[:1])])
        with pytest.raises(CloudUnavailable, match="circuit breaker open"):
            up.infer("digits", [to_wire(pixels[:1])])
        time.sleep(0.25)
        assert up.infer("digits", [to_wire(pixels[:1])])
        assert breaker.state is BreakerState.CLOSED


SECRET = "s3cr3t-token-value-9f8e7d"


def test_client_sends_the_auth_header_and_never_shows_the_secret(pixels: np.ndarray,
                                                                 caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.DEBUG)
    environ = {"EDGEFN_CLOUD_TOKEN": f"Bearer {SECRET}"}
    with start_server(MODELS, auth=("Authorization", f"Bearer {SECRET}")) as guarded:
        with CloudClient(guarded.url, auth_header="Authorization", auth_env="EDGEFN_CLOUD_TOKEN",
                         environ=environ) as client:
            assert client.ready("digits")
            assert client.infer("digits", [to_wire(pixels[:1])])
            shown = [repr(client), str(vars(client)), repr(client._http.auth)]
        with CloudClient(guarded.url) as anonymous:
            assert not anonymous.ready("digits")
            with pytest.raises(CloudError) as refused:
                anonymous.infer("digits", [to_wire(pixels[:1])])
            assert refused.value.status == 401
        # a failure with the header set: its message, and the retries' log lines
        with CloudClient(f"http://127.0.0.1:{free_port()}", auth_header="Authorization", retries=1,
                         backoff_s=0.01, auth_env="EDGEFN_CLOUD_TOKEN", environ=environ) as failing:
            with pytest.raises(CloudUnavailable) as unreachable:
                failing.infer("digits", [to_wire(pixels[:1])])
            shown += [repr(failing), str(unreachable.value)]
    assert "try 2 of 2" in caplog.text
    for text in [caplog.text, *shown]:
        assert SECRET not in text


def test_client_config_errors():
    with pytest.raises(ConfigError, match="EDGEFN_NOT_SET"):
        CloudClient("http://127.0.0.1:1", auth_header="Authorization", auth_env="EDGEFN_NOT_SET", environ={})
    with pytest.raises(ConfigError, match="together"):
        CloudClient("http://127.0.0.1:1", auth_header="Authorization")
    with pytest.raises(ConfigError, match="cannot be an HTTP header") as bad:
        CloudClient("http://127.0.0.1:1", auth_header="X-Key", auth_env="K", environ={"K": f"{SECRET}\n"})
    assert SECRET not in str(bad.value)
    with pytest.raises(ConfigError, match="URL"):
        CloudClient("127.0.0.1:8000")


# --- the command -------------------------------------------------------------------------------------------


def drain(pipe: IO[str]) -> None:
    """Read a child's stderr to its end (so the child never blocks on a full pipe), then close it."""
    with pipe:
        pipe.read()


def start_cli(port: int, *extra: str) -> tuple[subprocess.Popen, str]:
    """`edgefn cloud serve` in a child process; (process, URL) once it listens."""
    process = subprocess.Popen([sys.executable, "-m", "edgefn", "cloud", "serve", "--models", str(MODELS),
                                "--port", str(port), *extra], stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "COLUMNS": "400"})
    assert process.stderr is not None
    for line in process.stderr:
        found = re.search(r"on (http://\S+)", line)
        if found:
            threading.Thread(target=drain, args=(process.stderr,), daemon=True).start()
            return process, found.group(1)
    process.stderr.close()
    raise AssertionError(f"edgefn cloud serve exited with {process.wait()} before listening")


@pytest.mark.slow
def test_cli_serve_survives_sigkill_and_restart(pixels: np.ndarray, local: ModelRegistry):
    process, url = start_cli(0, "--delay-ms", "1")
    port = int(url.rsplit(":", 1)[1])
    restarted: list[subprocess.Popen] = []
    try:
        with CloudClient(url, retries=40, backoff_s=0.05, max_backoff_s=0.2, timeout_s=5) as client:
            assert client.infer("digits-cnn", [to_wire(pixels[:1])])
            process.send_signal(signal.SIGKILL)
            process.wait()
            timer = threading.Timer(0.3, lambda: restarted.append(start_cli(port)[0]))
            timer.start()
            got = client.infer("digits-cnn", [to_wire(pixels[:16])])
            timer.join()
        want = expected(local, "digits-cnn", pixels[:16])
        assert_same(dict(zip(want, [from_wire(t) for t in got], strict=True)), want)
        assert restarted
        restarted[0].send_signal(signal.SIGTERM)
        assert restarted[0].wait(10) == 0
    finally:
        for p in [process, *restarted]:
            if p.poll() is None:
                p.kill()
                p.wait()


def test_cli_serve_clean_errors(tmp_path: Path):
    result = runner.invoke(app, ["cloud", "serve", "--models", str(tmp_path / "none")])
    assert result.exit_code == 2
    assert "no such models folder" in result.output
    result = runner.invoke(app, ["cloud", "serve", "--models", str(tmp_path)])
    assert result.exit_code == 2
    assert "no models" in result.output
    result = runner.invoke(app, ["cloud", "serve", "--models", str(MODELS), "--auth-header", "Authorization",
                                 "--auth-env", "EDGEFN_SURELY_NOT_SET"])
    assert result.exit_code == 2
    assert "EDGEFN_SURELY_NOT_SET" in result.output
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = runner.invoke(app, ["cloud", "serve", "--models", str(MODELS), "--port", str(port)])
    assert result.exit_code == 2
    assert f"cannot listen on 127.0.0.1:{port}" in result.output
    assert "Traceback" not in result.output


# --- hostile requests: a clear 400 or 413, never a 500, and the server stays up -----------------------------


@pytest.mark.parametrize(("body", "status", "says"), [
    (b'{"inputs": ' + b"[" * 5000 + b"]" * 5000 + b"}", 400, "nested too deeply"),
    (json.dumps({"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [0, 64], "data": []}]}).encode(),
     400, "holds no elements"),
    (b'{"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 64], "data": [' + b"9" * 5000 + b"]}]}",
     400, "not a JSON object"),
    (json.dumps({"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 64],
                             "data": [2**70] * 64}]}).encode(), 400, "must hold numbers"),
    (b'{"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 64], "data": ['
     + b"1.0," * (3 << 20) + b"1.0]}]}", 413, "send large tensors as binary data"),
])
def test_hostile_bodies_get_a_clear_error(http: httpx.Client, body: bytes, status: int, says: str):
    answer = http.post("/v2/models/digits/infer", content=body, timeout=60)
    assert answer.status_code == status and says in answer.json()["error"], answer.text[:300]
    assert http.get("/v2/health/live").status_code == 200


@pytest.fixture()
def chatty_loggers() -> Iterator[None]:
    """setup_logging changes process-wide loggers: put them back after the test."""
    saved = {name: logging.getLogger(name).level for name in ("httpx", "httpcore")}
    yield
    for name, level in saved.items():
        logging.getLogger(name).setLevel(level)


def test_each_request_is_a_debug_line_not_an_info_line(server: CloudServer, pixels: np.ndarray, chatty_loggers,
                                                       caplog: pytest.LogCaptureFixture):
    """httpx logs every request at INFO: one line per hand-off in the daemon's log, unless asked for."""
    from edgefn.cli._toolkit import setup_logging

    caplog.set_level(logging.INFO)
    setup_logging("info")
    with CloudClient(server.url) as client:
        assert client.infer("digits", [to_wire(pixels[:1])])
    assert not [r.getMessage() for r in caplog.records if r.name.startswith(("httpx", "httpcore"))]
    caplog.clear()
    caplog.set_level(logging.DEBUG)
    setup_logging("debug")  # --log-level debug shows them
    with CloudClient(server.url) as client:
        assert client.infer("digits", [to_wire(pixels[:1])])
    assert any("HTTP Request: POST" in r.getMessage() for r in caplog.records if r.name == "httpx")


def test_cloud_check_says_a_web_server_is_not_an_oip_endpoint_in_one_line(tmp_path: Path):
    """A plain HTTP server answers GET /v2 with its 404 page: that is no endpoint, not a missing model."""
    (tmp_path / "index.html").write_text("<!DOCTYPE HTML><html><body>hello</body></html>")
    handler = functools.partial(QuietHandler, directory=str(tmp_path))
    web = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=web.serve_forever, daemon=True).start()
    try:
        result = CliRunner(env={"COLUMNS": "400"}).invoke(
            app, ["cloud", "check", f"http://127.0.0.1:{web.server_port}", "--models", str(MODELS)])
    finally:
        web.shutdown()
        web.server_close()
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines() == [
        f"error: http://127.0.0.1:{web.server_port} is not an Open Inference Protocol v2 endpoint: "
        "GET /v2 answered 404, not its name and version"], result.output
    assert "DOCTYPE" not in result.output


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - http.server's name
        pass
