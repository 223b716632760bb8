"""Third-party inference servers, started by the tests as subprocesses of their own venvs (`make peers`
builds `.venv-peers/mlserver` and `.venv-peers/kserve`: their pins clash with edgefn's and with each
other's). Each serves the digits model; `url` is where, `kill()` takes it away at once."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from edgefn.mqtt.local_broker import free_port

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
PEERS = Path(os.environ.get("EDGEFN_PEERS_VENV", ROOT / ".venv-peers"))
DIGITS_ONNX = ROOT / "models" / "digits" / "model.onnx"
STARTUP_S = 120.0  # MLServer imports a lot; on two busy cores it takes tens of seconds

# The digits model as its model.json says, declared in MLServer's model-settings (its metadata then lists it).
DECLARED = {
    "inputs": [{"name": "pixels", "datatype": "FP32", "shape": [-1, 64]}],
    "outputs": [{"name": "label", "datatype": "INT64", "shape": [-1]},
                {"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]}],
}
# Where each model is on MLServer (the values of --cloud-model digits=...): the scikit-learn runtime names
# its outputs after the estimator's methods.
MLSERVER_ROUTES = {
    "mlserver-sklearn": "digits-sklearn,label=predict,probabilities=predict_proba",
    "mlserver-onnx-undeclared": "digits-onnx",
    "mlserver-onnx-declared": "digits-declared",
}


def peer_exe(kind: str, name: str) -> Path:
    path = PEERS / kind / "bin" / name
    if not path.exists():
        pytest.fail(f"{path} is missing: `make peers` builds the venvs of the third-party servers the tests run")
    return path


class PeerServer:
    """A server subprocess; ready once its V2 health route says so and each of `models` is ready."""

    def __init__(self, name: str, argv: list[str], port: int, models: list[str], log: Path, cwd: Path,
                 env: dict[str, str] | None = None):
        self.name, self.url, self.log = name, f"http://127.0.0.1:{port}", log
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(argv, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                         env={**os.environ, **(env or {})}, start_new_session=True)
        try:
            self._wait_ready(models)
        except BaseException:
            self.kill()
            raise

    def _wait_ready(self, models: list[str]) -> None:
        deadline = time.monotonic() + STARTUP_S
        routes = ["/v2/health/ready", *(f"/v2/models/{m}/ready" for m in models)]
        while routes:
            if self.proc.poll() is not None:
                pytest.fail(f"{self.name} exited ({self.proc.returncode}) while starting:\n{self._tail()}")
            if time.monotonic() > deadline:
                pytest.fail(f"{self.name} not ready within {STARTUP_S:.0f} s:\n{self._tail()}")
            try:
                with urllib.request.urlopen(self.url + routes[0], timeout=2) as answer:
                    if answer.status == 200:
                        routes.pop(0)
                        continue
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)

    def _tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]

    def kill(self) -> None:
        """SIGKILL to the server and whatever it started (MLServer's workers): gone mid-request."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def __enter__(self) -> PeerServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()


def mlserver_repository(folder: Path) -> Path:
    """MLServer's model repository: the digits model three ways (scikit-learn runtime; the ONNX file through
    a custom runtime, with model-settings that declare no tensors, and with the tensors declared)."""
    folder.mkdir(parents=True, exist_ok=True)
    sklearn = folder / "digits-sklearn"
    sklearn.mkdir()
    subprocess.run([str(peer_exe("mlserver", "python")), str(HERE / "sklearn_digits.py"), str(sklearn / "model.joblib")],
                   check=True, timeout=300)
    _settings(sklearn, {"name": "digits-sklearn", "implementation": "mlserver_sklearn.SKLearnModel",
                        "parameters": {"uri": "./model.joblib"}})
    for name, declared in (("digits-onnx", {}), ("digits-declared", DECLARED)):
        (folder / name).mkdir()
        shutil.copy(DIGITS_ONNX, folder / name / "model.onnx")
        _settings(folder / name, {"name": name, "implementation": "mlserver_onnx.OnnxModel",
                                  "parameters": {"uri": "./model.onnx"}, **declared})
    return folder


def _settings(folder: Path, doc: dict) -> None:
    (folder / "model-settings.json").write_text(json.dumps(doc))


def start_mlserver(repository: Path, log: Path, port: int | None = None) -> PeerServer:
    """`mlserver start` on the repository, inference in its main process (parallel_workers 0: one
    process, less to start on two cores)."""
    port = port or free_port()
    (repository / "settings.json").write_text(json.dumps({
        "host": "127.0.0.1", "http_port": port, "grpc_port": free_port(), "metrics_port": free_port(),
        "parallel_workers": 0, "load_models_at_startup": True}))
    return PeerServer("MLServer", [str(peer_exe("mlserver", "mlserver")), "start", "."], port,
                      ["digits-sklearn", "digits-onnx", "digits-declared"], log, cwd=repository,
                      env={"PYTHONPATH": str(HERE)})  # the custom runtime's module


def start_kserve(log: Path, port: int | None = None) -> PeerServer:
    """KServe's Python model server (V2 REST, no gRPC) serving the digits ONNX file as `digits`."""
    port = port or free_port()
    argv = [str(peer_exe("kserve", "python")), str(HERE / "kserve_digits.py"), "--model_name", "digits",
            "--model_path", str(DIGITS_ONNX), "--http_port", str(port)]
    return PeerServer("KServe", argv, port, ["digits"], log, cwd=log.parent)
