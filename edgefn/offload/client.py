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
  something that is not an OIP response. `.status` is the HTTP status, if any. A 401 or 403 also opens
  the breaker for its long back-off (a minute, doubling to ten): the credentials are wrong for every
  request, so the next ones run here without asking.

The auth header's value is read from an environment variable when the client is made; it is kept out
of `repr`, logs and error messages.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import time
import uuid
from collections.abc import Generator, Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import httpx

from edgefn.config import HTTP_SCHEMES, HTTP_SHAPE, check_url, redact_url, split_credentials
from edgefn.errors import CloudError, CloudUnavailable, ConfigError, ModelError
from edgefn.inference.tensors import WireTensor, from_wire, to_wire
from edgefn.offload import contract as contract_
from edgefn.offload.breaker import BreakerState, CircuitBreaker
from edgefn.offload.status import HandoffStatus
from edgefn.protocol import oip

if TYPE_CHECKING:
    from edgefn.config import Settings
    from edgefn.inference.model import ModelInfo
    from edgefn.observe.metrics import Metrics

log = logging.getLogger("edgefn.offload")

# Statuses that refuse the client itself, not one request: they open the breaker for its long back-off.
REFUSED = (401, 403)

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
    """An OIP v2 endpoint at `url`; `model_map` renames edge models to the endpoint's (default: same name),
    and their tensors where a value reads "NAME,TENSOR=NAME,..." (`edgefn.offload.contract.parse_routes`).

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
        try:
            check_url(url, HTTP_SCHEMES, HTTP_SHAPE)
        except ValueError as exc:
            raise ConfigError(f"cloud_url {redact_url(url)!r} is not an endpoint's URL: {exc}") from None
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
        self._routes = contract_.parse_routes(self.model_map)
        self.status = HandoffStatus(self.url)
        # Settled once (one dict write is atomic: no lock; two threads may both ask the first time).
        self._plans: dict[tuple[str, Any], contract_.Plan] = {}
        self._binary: bool | None = None
        self._refusal = ""  # the last 401/403, for /healthz

    def __repr__(self) -> str:
        return (f"CloudClient(url={self.url!r}, model_map={self.model_map!r}, auth_header={self.auth_header!r}, "
                f"timeout_s={self.timeout_s}, retries={self.retries})")

    def __enter__(self) -> CloudClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def problem(self) -> str | None:
        """Why the hand-off does not work now, for /healthz: the endpoint refuses us, or some model's last
        hand-off failed; None when it works (or nothing was handed off yet)."""
        stats = self.breaker.stats()
        if stats.reason == "refused" and stats.state is not BreakerState.CLOSED:
            when = f"in {stats.retry_in_s:.0f} s" if stats.retry_in_s is not None else "now"
            return (f"the cloud endpoint {self.url} refuses hand-off ({self._refusal}): events run here; "
                    f"it is asked again {when}")
        status = self.status.snapshot()
        if status["state"] == "failing":
            last = status["last_error"] or {}
            return (f"hand-off to {self.url} fails for {', '.join(status['failing'])} "
                    f"({last.get('reason')}: {last.get('error')}): events run here")
        return None

    def ready(self, model: str) -> bool:
        """Whether the endpoint says `model` is ready (one try, no breaker: this is the probe)."""
        try:
            return self._http.get(self._path(model, "ready")).status_code == 200
        except httpx.HTTPError:
            return False

    def server_metadata(self) -> dict[str, Any]:
        """What the endpoint says of itself (GET /v2: an OIP server answers {name, version, extensions}),
        through the breaker; a CloudError with reason not-oip when it does not answer like one (a web
        server, another API), so that is said rather than its 404 page."""
        try:
            response = self._send("GET", "/v2")
        except CloudError as exc:
            if type(exc) is not CloudError or exc.status in REFUSED:
                raise  # no answer, or a refusal: an OIP server with a token may say so
            doc, answered = None, f"{exc.status}"
        else:
            try:
                doc = response.json()
            except ValueError:
                doc = None
            answered = f"{response.status_code} {response.headers.get('content-type', '')}".strip()
        if not (isinstance(doc, dict) and "name" in doc and "version" in doc):
            raise CloudError(f"{self.url} is not an Open Inference Protocol v2 endpoint: GET /v2 answered "
                             f"{answered}, not its name and version", reason="not-oip")
        return doc

    def metadata(self, model: str) -> dict[str, Any]:
        """The endpoint's metadata of `model` (GET /v2/models/{name}), through the breaker."""
        response = self._send("GET", self._path(model))
        try:
            doc = response.json()
        except ValueError as exc:
            raise CloudError(f"{self.url}: model {self._cloud_name(model)}: unusable metadata: {exc}",
                             reason="bad-answer") from None
        if not isinstance(doc, dict):
            raise CloudError(f"{self.url}: model {self._cloud_name(model)}: unusable metadata: not a JSON object",
                             reason="bad-answer")
        return doc

    def plan(self, model: str, contract: ModelInfo | None = None) -> contract_.Plan:
        """The exchange for `model` (its names there, checked against the endpoint's metadata), settled
        once per model and contract."""
        key = (model, None if contract is None else (contract.inputs, contract.outputs))
        plan = self._plans.get(key)
        if plan is None:
            route = self.route(model)
            try:
                plan = contract_.plan(route, contract, self.metadata(model))
            except CloudError as exc:
                if type(exc) is CloudError and exc.reason in ("mismatch", "bad-answer"):
                    raise CloudError(f"{self.url}: {exc}", exc.status, exc.reason) from None
                raise
            self._plans[key] = plan
        return plan

    def infer(self, model: str, inputs: list[WireTensor], outputs: list[str] | None = None, *,
              request_id: str | None = None, contract: ModelInfo | None = None) -> list[WireTensor]:
        """Run `model` on the endpoint: `inputs` in the model's input order. `contract` is the local
        model.json: inputs are named and outputs read by it, and come back as the local model gives them
        (all its outputs in its order, or those named in `outputs`). Without one, the endpoint's metadata
        names the inputs and the outputs come back as answered. Each outcome is recorded in `status`."""
        try:
            answer = self._infer(model, inputs, outputs, request_id, contract)
        except CloudError as exc:
            self.status.failed(model, exc)
            raise
        self.status.succeeded(model)
        return answer

    def _infer(self, model: str, inputs: list[WireTensor], outputs: list[str] | None, request_id: str | None,
               contract: ModelInfo | None) -> list[WireTensor]:
        plan = self.plan(model, contract)
        arrays = [from_wire(t) for t in inputs]
        if len(plan.inputs) != len(arrays):
            raise CloudError(f"model {plan.model} on {self.url} takes {len(plan.inputs)} input(s) "
                             f"({', '.join(plan.inputs)}), got {len(arrays)}", reason="mismatch")
        asked = _asked(plan, outputs, self.route(model))
        threshold = self.binary_threshold
        binary = threshold is not None and any(a.nbytes >= threshold for a in arrays) and self._takes_binary()
        head: dict[str, Any] = {"inputs": []}
        blobs = []
        for name, array in zip(plan.inputs, arrays, strict=True):
            entry, blob = oip.tensor_entry(name, array, binary and array.nbytes >= threshold)  # type: ignore[operator]
            head["inputs"].append(entry)
            if blob is not None:
                blobs.append(blob)
        # Always an id: KServe's custom models echo the request's, and fail without one.
        head["id"] = request_id if request_id is not None else uuid.uuid4().hex
        # A server that takes binary inputs gives binary outputs: cheaper to read.
        if asked is not None:
            head["outputs"] = [{"name": n, "parameters": {"binary_data": True}} if binary else {"name": n}
                               for n in asked]
        elif binary:
            head["parameters"] = {"binary_data_output": True}
        body, headers = oip.encode_body(head, blobs)
        response = self._send("POST", self._path(model, "infer"), body, headers)
        return self._outputs(plan, response, asked, head["id"])

    def _outputs(self, plan: contract_.Plan, response: httpx.Response, asked: list[str] | None,
                 request_id: str) -> list[WireTensor]:
        try:
            head, rest = oip.decode_body(response.content, response.headers.get(oip.HEADER_LENGTH))
            if head.get("id") not in (request_id, None):  # an answer need not repeat the id
                raise oip.ProtocolError(f"it answers request {head.get('id')!r}, not {request_id!r}")
            got = {name: array for name, array, _ in oip.read_tensors(head.get("outputs"), rest, "outputs",
                                                                       lenient=True)}
            if plan.outputs is not None:
                kept = [(n, s) for n, s in plan.outputs if asked is None or n in asked]
                return [to_wire(a) for a in contract_.conform(contract_.Plan(plan.model, plan.inputs, tuple(kept)),
                                                              got)]
            if asked is not None and (missing := [n for n in asked if n not in got]):
                raise oip.ProtocolError(f"outputs {missing} are missing")
            return [to_wire(got[n]) for n in (asked if asked is not None else got)]
        except (oip.ProtocolError, ModelError) as exc:
            raise CloudError(f"{self.url}: model {plan.model}: unusable answer: {exc}", reason="bad-answer") from None
        except CloudError as exc:
            raise CloudError(f"{self.url}: {exc}", exc.status, exc.reason) from None

    def _takes_binary(self) -> bool:
        """Whether the endpoint lists the binary tensor extension (GET /v2, asked once): MLServer does not,
        and refuses such a body."""
        if self._binary is None:
            try:
                extensions = self.server_metadata().get("extensions", [])
            except CloudUnavailable:
                raise
            except CloudError:
                extensions = []
            self._binary = isinstance(extensions, list) and oip.EXTENSIONS[0] in extensions
        return self._binary

    def route(self, model: str) -> contract_.Route:
        """Where `model` is on the endpoint: its name and its tensors' names there."""
        return self._routes.get(model) or contract_.Route(model)

    def _cloud_name(self, model: str) -> str:
        return self.route(model).name

    def _path(self, model: str, *tail: str) -> str:
        return "/".join(("/v2/models", quote(self._cloud_name(model), safe=""), *tail))

    def _send(self, method: str, path: str, body: bytes | None = None,
              headers: Mapping[str, str] | None = None) -> httpx.Response:
        """One exchange through the breaker, tried again on connection failures and 5xx; a 2xx response."""
        permit = self.breaker.acquire()
        if permit is None:
            why = ("it refused our credentials recently" if self.breaker.stats().reason == "refused"
                   else "the endpoint failed recently")
            raise CloudUnavailable(f"{self.url}: circuit breaker open ({why})", reason="breaker-open")
        try:
            response = self._exchange(method, path, body, headers)
        except BaseException:
            permit.failed()
            raise
        if response.status_code in REFUSED:
            self._refusal = f"{response.status_code} {_error_text(response)}"
            permit.refused()  # a wrong or expired credential: every request would be refused alike
        else:
            permit.succeeded()  # it answered: another 4xx is the request's fault, not the endpoint's
        if response.status_code >= 400:
            raise CloudError(f"{self.url}{path}: {response.status_code} {_error_text(response)}",
                             response.status_code, "not-served" if response.status_code == 404 else "refused")
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
                raise CloudUnavailable(f"{self.url}{path}: no answer within {self.timeout_s} s",
                                       reason="timeout") from None
            except httpx.HTTPError as exc:
                raise CloudUnavailable(f"{self.url}{path}: {type(exc).__name__}: {exc}") from None
            else:
                if response.status_code < 500:
                    return response
                problem = f"{response.status_code} {_error_text(response)}"
                if last:
                    raise CloudUnavailable(f"{self.url}{path}: {problem} after {attempt + 1} tries",
                                           response.status_code, "server-error")
            pause = min(self.max_backoff_s, self.backoff_s * 2 ** attempt) * random.uniform(0.5, 1.0)
            log.info("cloud endpoint %s%s: %s; try %d of %d in %.2f s", self.url, path, problem, attempt + 2,
                     self.retries + 1, pause)
            time.sleep(pause)
        raise AssertionError("unreachable")


def _asked(plan: contract_.Plan, outputs: list[str] | None, route: contract_.Route) -> list[str] | None:
    """The output names to ask the endpoint for: those named (local names), else all the local model's;
    None (everything) without a local model.json and no names."""
    if outputs is not None:
        return [route.there(n) for n in outputs]
    return None if plan.outputs is None else [n for n, _ in plan.outputs]


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
