"""A reference Open Inference Protocol v2 (KServe V2) REST endpoint: the models of a models folder, run by
onnxruntime, for edge devices to hand inference off to (and for tests and benchmarks of that hand-off).

    GET  /v2/health/live                                   200 while the server runs
    GET  /v2/health/ready                                  200 when every model is loaded, else 400
    GET  /v2                                               server metadata (extensions: binary_tensor_data)
    GET  /v2/models/{name}[/versions/1]                    model metadata
    GET  /v2/models/{name}[/versions/1]/ready              200, or 400 when it could not be loaded
    POST /v2/models/{name}[/versions/1]/infer              inference, JSON and binary tensors

Each model is served under its model.json name as version "1", as the variant edgefn's ModelRegistry
picks among the ONNX ones. Errors are `{"error": "..."}`: 400 for a malformed request or one the model
cannot take, 404 for an unknown model or version, 401 without the auth header (when one is required),
413 for a body over the limit, 500 when the model fails, 503 when it could not be loaded. Inference runs
on a thread pool, never on the event loop.

`start_server` runs it in a thread of this process (tests, benchmarks); `serve_forever` in the
foreground (`edgefn cloud serve`). Both take the app of `create_app`, to which other routers can be added.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import signal
import socket
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from edgefn import __version__
from edgefn.errors import EdgefnError, ModelError, validation_text
from edgefn.inference.backends.base import Backend
from edgefn.inference.delegates import DEFAULT_CHAINS
from edgefn.inference.model import ModelInfo, TensorSpec
from edgefn.inference.registry import ModelRegistry
from edgefn.protocol import oip

log = logging.getLogger("cloud_sync.serve")

VERSION = "1"
PLATFORMS = {"onnx": "onnxruntime_onnx", "tflite": "tensorflow_lite"}
SERVER_NAME = "edgefn-cloud"
MAX_BODY_BYTES = 64 << 20


@dataclass(frozen=True)
class ServedModel:
    """A model of the folder: loaded (`backend`), or not, with the `problem`."""

    info: ModelInfo
    backend: Backend | None
    platform: str
    problem: str | None = None


class OipEndpoint:
    """Every model of `registry`, loaded now, answering OIP v2 requests through `router()`.

    `delay_ms` holds each request that long before answering (a network's delay, for benchmarks);
    `auth` is (header, value) a request must carry; `workers` is the size of the inference pool.
    """

    def __init__(self, registry: ModelRegistry, *, delay_ms: float = 0.0, auth: tuple[str, str] | None = None,
                 workers: int | None = None, max_body_bytes: int = MAX_BODY_BYTES):
        self.delay_s = delay_ms / 1000
        self._auth = (auth[0], auth[1].encode()) if auth else None
        self.max_body_bytes = max_body_bytes
        self.models = {name: self._load(registry, name) for name in registry.names()}
        self._pool = ThreadPoolExecutor(workers or os.cpu_count() or 2, thread_name_prefix="oip-infer")

    @classmethod
    def from_folders(cls, folders: Sequence[Path], **options: Any) -> OipEndpoint:
        """The ONNX models under `folders`, each as the variant the registry ranks first."""
        missing = [str(f) for f in folders if not Path(f).is_dir()]
        if missing:
            raise EdgefnError(f"no such models folder: {', '.join(missing)}")
        registry = ModelRegistry(folders, chains={"onnx": DEFAULT_CHAINS["onnx"]})
        if not registry.names():
            raise EdgefnError(f"no models (folders with a model.json) under {', '.join(map(str, folders))}")
        return cls(registry, **options)

    @staticmethod
    def _load(registry: ModelRegistry, name: str) -> ServedModel:
        info = registry.info(name)
        try:
            backend = registry.get(name)
        except ModelError as exc:
            log.warning("model %s is not served: %s", name, exc)
            return ServedModel(info, None, PLATFORMS["onnx"], str(exc))
        return ServedModel(info, backend, PLATFORMS.get(backend.format, backend.format))

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    # --- HTTP --------------------------------------------------------------------------------------

    def router(self) -> APIRouter:
        router = APIRouter(prefix="/v2", dependencies=[Depends(self._gate)])
        router.add_api_route("/health/live", self._live, methods=["GET"])
        router.add_api_route("/health/ready", self._ready, methods=["GET"])
        router.add_api_route("", self._server_metadata, methods=["GET"])
        for model in ("/models/{name}", "/models/{name}/versions/{version}"):
            router.add_api_route(model, self._model_metadata, methods=["GET"])
            router.add_api_route(model + "/ready", self._model_ready, methods=["GET"])
            router.add_api_route(model + "/infer", self._infer, methods=["POST"])
        return router

    async def _gate(self, request: Request) -> None:
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self._auth is not None:
            header, value = self._auth
            if not hmac.compare_digest(request.headers.get(header, "").encode(), value):
                raise HTTPException(401, f"missing or wrong {header} header")

    async def _live(self) -> Response:
        return Response(status_code=200)

    async def _ready(self) -> Response:
        problems = [f"{name}: {m.problem}" for name, m in self.models.items() if m.backend is None]
        return _error(oip.OipError("; ".join(problems), status=400)) if problems else Response(status_code=200)

    async def _server_metadata(self) -> Response:
        return _json({"name": SERVER_NAME, "version": __version__, "extensions": list(oip.EXTENSIONS)})

    async def _model_metadata(self, name: str, version: str | None = None) -> Response:
        try:
            return _json(self.metadata(name, version))
        except oip.OipError as exc:
            return _error(exc)

    async def _model_ready(self, name: str, version: str | None = None) -> Response:
        try:
            model = self.model(name, version)
        except oip.OipError as exc:
            return _error(exc)
        if model.backend is None:
            return _error(oip.OipError(f"model {name} is not ready: {model.problem}", status=400))
        return Response(status_code=200)

    async def _infer(self, request: Request, name: str, version: str | None = None) -> Response:
        try:
            body = await self._body(request)
        except oip.OipError as exc:
            return _error(exc)
        header_length = request.headers.get(oip.HEADER_LENGTH)
        loop = asyncio.get_running_loop()
        content, headers, status = await loop.run_in_executor(self._pool, self.infer, name, version, body,
                                                              header_length)
        return Response(content, status_code=status, headers=headers)

    async def _body(self, request: Request) -> bytes:
        encoding = request.headers.get("content-encoding", "identity")
        if encoding != "identity":
            raise oip.OipError(f"Content-Encoding {encoding} is not supported: send the body uncompressed",
                               status=415)
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            raise oip.OipError(f"the body is larger than {self.max_body_bytes} bytes", status=413)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body_bytes:
                raise oip.OipError(f"the body is larger than {self.max_body_bytes} bytes", status=413)
            chunks.append(chunk)
        return b"".join(chunks)

    # --- the protocol, without HTTP ----------------------------------------------------------------

    def model(self, name: str, version: str | None) -> ServedModel:
        model = self.models.get(name)
        if model is None:
            raise oip.OipError(f"no model named {name!r} (served: {', '.join(self.models) or 'none'})", status=404)
        if version is not None and version != VERSION:
            raise oip.OipError(f"model {name} has no version {version!r} (it has: {VERSION})", status=404)
        return model

    def metadata(self, name: str, version: str | None) -> dict[str, Any]:
        model = self.model(name, version)
        try:
            return {"name": name, "versions": [VERSION], "platform": model.platform,
                    "inputs": [_tensor_metadata(s) for s in model.info.inputs],
                    "outputs": [_tensor_metadata(s) for s in model.info.outputs]}
        except oip.ProtocolError as exc:  # a tensor the protocol has no datatype for: the server's fault
            raise oip.OipError(str(exc), status=500) from None

    def infer(self, name: str, version: str | None, body: bytes,
              header_length: str | None) -> tuple[bytes, dict[str, str], int]:
        """(body, headers, status) of the answer to one inference request."""
        try:
            return *self._answer(name, version, body, header_length), 200
        except oip.OipError as exc:  # ProtocolError among them: a 400
            status, message = exc.status, str(exc)
        except Exception as exc:  # a bug: still an answer in the protocol's form, and a traceback in the log
            log.exception("inference request for model %s failed", name)
            status, message = 500, f"internal error: {type(exc).__name__}: {exc}"
        return *_error_body(message), status

    def _answer(self, name: str, version: str | None, body: bytes,
                header_length: str | None) -> tuple[bytes, dict[str, str]]:
        model = self.model(name, version)
        if model.backend is None:
            raise oip.OipError(f"model {name} is not ready: {model.problem}", status=503)
        head, rest = oip.decode_body(body, header_length)
        params = oip.parameters(head, "the request")
        request_id = head.get("id")
        if request_id is not None and not isinstance(request_id, str):
            raise oip.ProtocolError(f"'id' must be a string, got {request_id!r}")
        inputs = _arrange(model, oip.read_tensors(head.get("inputs"), rest, "inputs"))
        wanted = _wanted(model, head.get("outputs"), bool(params.get("binary_data_output", False)))
        try:
            results = dict(zip(model.backend.outputs, model.backend.run(inputs), strict=True))
            answer: dict[str, Any] = {"model_name": name, "model_version": VERSION}
            if request_id is not None:
                answer["id"] = request_id
            answer["outputs"], blobs = [], []
            for output, binary in wanted:
                entry, blob = oip.tensor_entry(output, results[output], binary)
                answer["outputs"].append(entry)
                if blob is not None:
                    blobs.append(blob)
        except (ModelError, oip.ProtocolError) as exc:  # the request was fine: the model failed
            raise oip.OipError(str(exc), status=500) from None
        return oip.encode_body(answer, blobs)


def _arrange(model: ServedModel, tensors: list[tuple[str, np.ndarray, dict]]) -> list[np.ndarray]:
    """The request's tensors in the model's input order, each checked against its spec."""
    specs = model.info.inputs
    given = {name: array for name, array, _ in tensors}
    if len(given) != len(tensors):
        raise oip.ProtocolError("an input is given twice")
    unknown = sorted(set(given) - {s.name for s in specs})
    missing = [s.name for s in specs if s.name not in given]
    if unknown or missing:
        raise oip.ProtocolError(f"model {model.info.name} takes inputs {[s.name for s in specs]}; "
                                f"unknown: {unknown}, missing: {missing}")
    for spec in specs:
        array = given[spec.name]
        if array.size == 0:  # a 0-row batch: nothing to run, and some models fail on it
            raise oip.ProtocolError(f"input {spec.name!r} holds no elements (shape {list(array.shape)})")
        if not spec.accepts(array):
            raise oip.ProtocolError(f"input {spec.name!r} must be {_describe(spec)}, "
                                    f"got {oip.datatype(array.dtype)} {list(array.shape)}")
    return [given[s.name] for s in specs]


def _wanted(model: ServedModel, requested: Any, binary_default: bool) -> list[tuple[str, bool]]:
    """(output, as binary?) for each output to answer with, in the order asked (all, when none are)."""
    names = [s.name for s in model.info.outputs]
    if requested is None:
        return [(n, binary_default) for n in names]
    if not isinstance(requested, list) or not all(isinstance(r, dict) and isinstance(r.get("name"), str)
                                                  for r in requested):
        raise oip.ProtocolError("'outputs' must be a list of objects with a 'name'")
    wanted = []
    for entry in requested:
        if entry["name"] not in names:
            raise oip.ProtocolError(f"model {model.info.name} has no output {entry['name']!r} (it has: {names})")
        params = oip.parameters(entry, f"output {entry['name']!r}")
        if "classification" in params:
            raise oip.ProtocolError("the classification extension is not supported")
        wanted.append((entry["name"], bool(params.get("binary_data", binary_default))))
    if len({n for n, _ in wanted}) != len(wanted):
        raise oip.ProtocolError("an output is asked for twice")
    return wanted


def _tensor_metadata(spec: TensorSpec) -> dict[str, Any]:
    return {"name": spec.name, "datatype": oip.datatype(spec.dtype), "shape": list(spec.shape)}


def _describe(spec: TensorSpec) -> str:
    return f"{oip.datatype(spec.dtype)} {list(spec.shape)}"


def _json(doc: dict[str, Any]) -> Response:
    return Response(oip.encode_body(doc, [])[0], media_type=oip.JSON_TYPE)


def _error_body(message: str) -> tuple[bytes, dict[str, str]]:
    return oip.encode_body({"error": message}, [])


def _error(exc: oip.OipError) -> Response:
    content, headers = _error_body(str(exc))
    return Response(content, status_code=exc.status, headers=headers)


def create_app(endpoint: OipEndpoint | None = None) -> FastAPI:
    """The ASGI app: the endpoint's OIP routes (none without one), every error as `{"error": ...}`. Add
    routers to it freely."""
    app = FastAPI(title="edgefn cloud", version=__version__)
    if endpoint is not None:
        app.include_router(endpoint.router())

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"error": validation_text(exc)}, status_code=400)

    return app


# --- serving -------------------------------------------------------------------------------------------


def _listen(host: str, port: int) -> socket.socket:
    """A listening socket (port 0: any free one), so the URL is known before the server starts."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP named, not left 0: asyncio turns Nagle's algorithm off (TCP_NODELAY) only on sockets whose
    # proto says TCP, and an accepted socket takes the listener's. With it on, each answer's body waits for
    # the client's delayed ACK of its headers: 40 ms.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise EdgefnError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


@dataclass(frozen=True)
class Tls:
    """The server's certificate chain and private key (PEM files): it then speaks HTTPS only."""

    certfile: Path
    keyfile: Path


def _url(sock: socket.socket, tls: Tls | None = None) -> str:
    host, port = sock.getsockname()[:2]
    scheme = "https" if tls is not None else "http"
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"


def _server(app: FastAPI, tls: Tls | None = None) -> uvicorn.Server:
    # log_config=None: leave logging to the program (the CLI's format, pytest's capture).
    config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="off", timeout_graceful_shutdown=2,
                            ssl_certfile=str(tls.certfile) if tls else None,
                            ssl_keyfile=str(tls.keyfile) if tls else None)
    if tls is not None:
        try:
            config.load()  # reads the certificate and key now: a bad file is a clear error, not a dead thread
        except (OSError, ValueError) as exc:
            raise EdgefnError(f"TLS: cannot use {tls.certfile} and {tls.keyfile}: {exc}") from None
    return uvicorn.Server(config)


_Server = TypeVar("_Server", bound="ThreadServer")


class ThreadServer:
    """An app serving from a daemon thread of this process: `.url`; `close()` stops it and then releases
    what it served (`_release`), once."""

    def __init__(self, app: FastAPI, sock: socket.socket, name: str, tls: Tls | None = None):
        self._sock, self.url = sock, _url(sock, tls)
        try:
            self._server = _server(app, tls)
        except EdgefnError:
            sock.close()
            raise
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, name=name, daemon=True)
        self._thread.start()
        while not self._server.started and self._thread.is_alive():
            self._thread.join(0.01)
        if not self._server.started:
            self.close()
            raise EdgefnError(f"the server on {self.url} did not start")

    def __enter__(self: _Server) -> _Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._sock.fileno() < 0:
            return
        self._server.should_exit = True
        self._thread.join()
        self._sock.close()
        self._release()

    def _release(self) -> None:
        """What the server served, closed after it stopped."""


class CloudServer(ThreadServer):
    """An OIP endpoint serving from a thread of this process."""

    def __init__(self, endpoint: OipEndpoint, app: FastAPI, sock: socket.socket):
        self.endpoint = endpoint
        super().__init__(app, sock, "oip-server")

    def __repr__(self) -> str:
        return f"CloudServer(url={self.url!r}, models={list(self.endpoint.models)})"

    def _release(self) -> None:
        self.endpoint.close()


def start_server(models: Path | Sequence[Path] | OipEndpoint, *, host: str = "127.0.0.1", port: int = 0,
                 delay_ms: float = 0.0, auth: tuple[str, str] | None = None) -> CloudServer:
    """Serve the models of a folder (or folders, or an endpoint made already) from a thread of this process."""
    endpoint = models if isinstance(models, OipEndpoint) else OipEndpoint.from_folders(
        [models] if isinstance(models, Path) else list(models), delay_ms=delay_ms, auth=auth)
    try:
        sock = _listen(host, port)
    except EdgefnError:
        endpoint.close()
        raise
    return CloudServer(endpoint, create_app(endpoint), sock)


def serve_forever(app: FastAPI, *, host: str, port: int, on_listening: Callable[[str], None] | None = None,
                  tls: Tls | None = None) -> None:
    """Serve `app` in the foreground until SIGINT or SIGTERM (in-flight requests finish first)."""
    server = _server(app, tls)
    sock = _listen(host, port)
    # uvicorn stops on SIGINT/SIGTERM, then raises the signal again under the handlers it found: let
    # those be no-ops, so a stop asked for is a clean exit (status 0), as with `edgefn run`.
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        if on_listening is not None:
            on_listening(_url(sock, tls))
        server.run(sockets=[sock])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        sock.close()
