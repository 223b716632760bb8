"""The edge's client of a cloud inference endpoint speaking the Open Inference Protocol v2 (Triton,
KServe, Seldon MLServer, `edgefn cloud serve`).

`CloudClient.infer` takes and gives the tensors `host.infer` carries (`WireTensor`), sends inputs of
`binary_threshold` bytes or more with the binary tensor extension (and then asks for binary outputs),
the rest as JSON, and reads either kind of answer. One pooled httpx client serves every thread.

Errors, at this boundary only:
- `CloudUnavailable`: no answer. The circuit breaker is open (no network call is made), the endpoint
  cannot be reached, it answered 5xx, or it gave no answer within `timeout_s`. Connection failures
  and 5xx are tried again, `retries` times with exponential backoff; a timeout is not (the latency
  budget is spent already). The caller runs the work here instead.
- `CloudError`: the endpoint answered, but refused the request (4xx: never tried again) or answered
  something that is not an OIP response. `.status` is the HTTP status, if any.

The auth header's value is read from an environment variable when the client is made; it is kept out
of `repr`, logs and error messages.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import time
from collections.abc import Generator, Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import httpx

from edgefn.config import redact_url, split_credentials
from edgefn.errors import CloudError, CloudUnavailable, ConfigError, ModelError
from edgefn.inference.tensors import WireTensor, from_wire, to_wire
from edgefn.offload.breaker import BreakerState, CircuitBreaker
from edgefn.protocol import oip

if TYPE_CHECKING:
    from edgefn.config import Settings
    from edgefn.observe.metrics import Metrics

log = logging.getLogger("edgefn.offload")

# Failures where the request surely or possibly did not reach a working server: worth another try
# (inference has no side effects, so a request that did arrive may run twice).
_RETRIED = (httpx.ConnectError, httpx.ConnectTimeout, httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError)


class _HeaderAuth(httpx.Auth):
    """Adds the auth header to each request; holds its value where no repr or header dump shows it."""

    def __init__(self, name: str, value: str):
        self._name, self._value = name, value

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers[self._name] = self._value
        yield request

    def __repr__(self) -> str:
        return f"_HeaderAuth({self._name!r}, '***')"


def header_secret(header: str | None, env: str | None, environ: Mapping[str, str],
                  names: tuple[str, str] = ("cloud_auth_header", "cloud_auth_env")) -> tuple[str, str] | None:
    """(header, value) for an auth header whose value is in the environment variable `env`; None when
    neither is given. `names` are what the user set them with, for the error messages."""
    if header is None and env is None:
        return None
    if not header or not env:
        raise ConfigError(f"{names[0]} and {names[1]} go together: the header's name, and the "
                          "environment variable that holds its value")
    value = environ.get(env)
    if not value:
        raise ConfigError(f"{names[1]} names {env}, which is not set (or empty)")
    if not (value.isascii() and value.isprintable()):
        raise ConfigError(f"{env} holds a value that cannot be an HTTP header (not printable ASCII)")
    return header, value


def _secret(auth_header: str | None, auth_env: str | None, environ: Mapping[str, str]) -> _HeaderAuth | None:
    secret = header_secret(auth_header, auth_env, environ)
    return _HeaderAuth(*secret) if secret else None


class CloudClient:
    """An OIP v2 endpoint at `url`; `model_map` renames edge models to the endpoint's (default: same name).

    Each call has `timeout_s` to connect, to send and to get its answer; connection failures and 5xx are
    tried `retries` more times, `backoff_s` apart at first, doubling up to `max_backoff_s` (with jitter).
    `breaker` guards the endpoint (a default one if none is given); `transport` is httpx's seam for tests
    (it brings its own connection limits and socket options).
    """

    def __init__(self, url: str, *, model_map: Mapping[str, str] | None = None, auth_header: str | None = None,
                 auth_env: str | None = None, timeout_s: float = 2.0, retries: int = 2, backoff_s: float = 0.05,
                 max_backoff_s: float = 1.0, binary_threshold: int | None = 1024,
                 breaker: CircuitBreaker | None = None, max_connections: int = 16,
                 environ: Mapping[str, str] = os.environ, transport: httpx.BaseTransport | None = None):
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"cloud_url must be an http:// or https:// URL, got {redact_url(url)!r}")
        if timeout_s <= 0 or retries < 0:
            raise ConfigError("cloud_timeout_s must be positive and cloud_retries not negative")
        # A user:password in the URL logs in (HTTP Basic) but is kept out of the URL itself, which httpx logs
        # with every request.
        url, user, password = split_credentials(url.rstrip("/"))
        auth: httpx.Auth | None = _secret(auth_header, auth_env, environ)
        if user is not None and auth is not None:
            raise ConfigError("cloud_url carries a user and password, and cloud_auth_header is set too: give one")
        if user is not None:
            auth = httpx.BasicAuth(user, password or "")
        self.url = url
        self.model_map = dict(model_map or {})
        self.auth_header = auth_header
        self.timeout_s, self.retries = timeout_s, retries
        self.backoff_s, self.max_backoff_s = backoff_s, max_backoff_s
        self.binary_threshold = binary_threshold
        self.breaker = breaker or CircuitBreaker()
        # TCP_NODELAY: httpx writes a request's headers and body apart, and Nagle's algorithm may hold the body
        # back until the server ACKs the headers (up to 40 ms where it delays its ACKs).
        transport = transport or httpx.HTTPTransport(
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
            socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)])
        self._http = httpx.Client(base_url=url, timeout=timeout_s, auth=auth,
                                  transport=transport)
        self._input_names: dict[str, list[str]] = {}  # one dict write is atomic: no lock

    def __repr__(self) -> str:
        return (f"CloudClient(url={self.url!r}, model_map={self.model_map!r}, auth_header={self.auth_header!r}, "
                f"timeout_s={self.timeout_s}, retries={self.retries})")

    def __enter__(self) -> CloudClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def ready(self, model: str) -> bool:
        """Whether the endpoint says `model` is ready (one try, no breaker: this is the probe)."""
        try:
            return self._http.get(self._path(model, "ready")).status_code == 200
        except httpx.HTTPError:
            return False

    def infer(self, model: str, inputs: list[WireTensor], outputs: list[str] | None = None, *,
              request_id: str | None = None) -> list[WireTensor]:
        """Run `model` on the endpoint: `inputs` in the model's input order; the outputs named (all the
        model's, in its order, when None)."""
        arrays = [from_wire(t) for t in inputs]
        names = self._inputs(model)
        if len(names) != len(arrays):
            raise CloudError(f"model {self._cloud_name(model)} on {self.url} takes {len(names)} input(s) "
                             f"({', '.join(names)}), got {len(arrays)}")
        threshold = self.binary_threshold
        head: dict[str, Any] = {"inputs": []}
        blobs = []
        for name, array in zip(names, arrays, strict=True):
            entry, blob = oip.tensor_entry(name, array, threshold is not None and array.nbytes >= threshold)
            head["inputs"].append(entry)
            if blob is not None:
                blobs.append(blob)
        binary = bool(blobs)  # a server that takes binary inputs gives binary outputs: cheaper to read
        if request_id is not None:
            head["id"] = request_id
        if outputs is not None:
            head["outputs"] = [{"name": n, "parameters": {"binary_data": binary}} for n in outputs]
        elif binary:
            head["parameters"] = {"binary_data_output": True}
        body, headers = oip.encode_body(head, blobs)
        response = self._send("POST", self._path(model, "infer"), body, headers)
        return self._outputs(model, response, outputs, request_id)

    def _outputs(self, model: str, response: httpx.Response, wanted: list[str] | None,
                 request_id: str | None) -> list[WireTensor]:
        try:
            head, rest = oip.decode_body(response.content, response.headers.get(oip.HEADER_LENGTH))
            if request_id is not None and head.get("id") != request_id:
                raise oip.ProtocolError(f"it answers request {head.get('id')!r}, not {request_id!r}")
            got = {name: array for name, array, _ in oip.read_tensors(head.get("outputs"), rest, "outputs")}
            if wanted is not None and (missing := [n for n in wanted if n not in got]):
                raise oip.ProtocolError(f"outputs {missing} are missing")
            return [to_wire(got[n]) for n in (wanted if wanted is not None else got)]
        except (oip.ProtocolError, ModelError) as exc:
            raise CloudError(f"{self.url}: model {self._cloud_name(model)}: unusable answer: {exc}") from None

    def _inputs(self, model: str) -> list[str]:
        """The endpoint model's input names, in order (its metadata, asked for once)."""
        names = self._input_names.get(model)
        if names is None:
            response = self._send("GET", self._path(model))
            try:
                doc = response.json()
                names = [str(i["name"]) for i in doc["inputs"]]
            except (ValueError, KeyError, TypeError) as exc:
                raise CloudError(f"{self.url}: model {self._cloud_name(model)}: unusable metadata: {exc!r}") from None
            self._input_names[model] = names
        return names

    def _cloud_name(self, model: str) -> str:
        return self.model_map.get(model, model)

    def _path(self, model: str, *tail: str) -> str:
        return "/".join(("/v2/models", quote(self._cloud_name(model), safe=""), *tail))

    def _send(self, method: str, path: str, body: bytes | None = None,
              headers: Mapping[str, str] | None = None) -> httpx.Response:
        """One exchange through the breaker, tried again on connection failures and 5xx; a 2xx response."""
        permit = self.breaker.acquire()
        if permit is None:
            raise CloudUnavailable(f"{self.url}: circuit breaker open (the endpoint failed recently)")
        try:
            response = self._exchange(method, path, body, headers)
        except BaseException:
            permit.failed()
            raise
        permit.succeeded()  # it answered: a 4xx is the request's fault, not the endpoint's
        if response.status_code >= 400:
            raise CloudError(f"{self.url}{path}: {response.status_code} {_error_text(response)}",
                             response.status_code)
        return response

    def _exchange(self, method: str, path: str, body: bytes | None,
                  headers: Mapping[str, str] | None) -> httpx.Response:
        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            try:
                response = self._http.request(method, path, content=body, headers=headers)
            except _RETRIED as exc:
                problem = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                if last:
                    raise CloudUnavailable(f"{self.url}{path}: unreachable after {attempt + 1} tries ({problem})") \
                        from None
            except httpx.TimeoutException:
                raise CloudUnavailable(f"{self.url}{path}: no answer within {self.timeout_s} s") from None
            except httpx.HTTPError as exc:
                raise CloudUnavailable(f"{self.url}{path}: {type(exc).__name__}: {exc}") from None
            else:
                if response.status_code < 500:
                    return response
                problem = f"{response.status_code} {_error_text(response)}"
                if last:
                    raise CloudUnavailable(f"{self.url}{path}: {problem} after {attempt + 1} tries",
                                           response.status_code)
            pause = min(self.max_backoff_s, self.backoff_s * 2 ** attempt) * random.uniform(0.5, 1.0)
            log.info("cloud endpoint %s%s: %s; try %d of %d in %.2f s", self.url, path, problem, attempt + 2,
                     self.retries + 1, pause)
            time.sleep(pause)
        raise AssertionError("unreachable")


def _error_text(response: httpx.Response) -> str:
    """The `error` of an OIP error object, else the start of the body."""
    try:
        return str(response.json()["error"])
    except (ValueError, KeyError, TypeError):
        return response.text[:200] or response.reason_phrase


def connect_cloud(settings: Settings, metrics: Metrics) -> CloudClient | None:
    """The daemon's client of its cloud endpoint (--cloud), with a circuit breaker whose state the
    metrics show; None without an endpoint."""
    s = settings
    if not s.cloud_url:
        return None

    def breaker_state(state: BreakerState) -> None:
        for value in BreakerState:
            metrics.breaker.labels(value.value).set(1 if value == state else 0)
        if state != BreakerState.CLOSED:
            log.warning("cloud endpoint circuit breaker %s: inference runs here", state.value)

    breaker = CircuitBreaker(cooldown_s=s.cloud_cooldown_s, on_change=lambda _old, new: breaker_state(new))
    client = CloudClient(s.cloud_url, model_map=s.cloud_model_map, auth_header=s.cloud_auth_header,
                         auth_env=s.cloud_auth_env, timeout_s=s.cloud_timeout_s, retries=s.cloud_retries,
                         breaker=breaker)
    breaker_state(breaker.state)
    log.info("cloud endpoint %s", client.url)
    return client
