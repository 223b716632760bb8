"""The fleet server's audit trail: every operator action appended to the `audit` table, refused ones too.

An ASGI middleware sees each request of an audited route (`AUDITED`) and writes its entry before the
answer leaves, so whatever the operator was told has its entry (or the failure to write it is logged):

    who        the credential's identity: "operator" (the operator's token), "anonymous" on a server
               without one (--insecure), "unauthenticated" (none given), "unknown <sha256 prefix>"
               (a token that is not the operator's)
    when       unix seconds
    what       publish, rollout.create|pause|resume|abort, device.enroll|revoke|remove
    arguments  the path's ids, the JSON body (or what a handler put in `request.state.audit_arguments`),
               secrets redacted
    result     the HTTP status, and what was done (`request.state.audit_result`) or why it was refused

Nothing in the API changes or deletes an entry, and the database refuses to (cloud_sync.fleet.db).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
import time
from typing import Any

from sqlalchemy import select
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cloud_sync.fleet.db import AuditRow, Database
from edgefn.protocol.fleet import API, AuditEntry

log = logging.getLogger("cloud_sync.fleet.audit")
_ID = r"(?P<id>[^/]+)"
AUDITED: list[tuple[str, re.Pattern[str], str]] = [
    ("POST", re.compile(re.escape(API) + r"/publish$"), "publish"),
    ("POST", re.compile(re.escape(API) + r"/rollouts$"), "rollout.create"),
    ("POST", re.compile(re.escape(API) + rf"/rollouts/{_ID}/(?P<verb>[^/]+)$"), "rollout.{verb}"),
    ("POST", re.compile(re.escape(API) + r"/enrollments$"), "device.enroll"),
    ("POST", re.compile(re.escape(API) + rf"/enrollments/{_ID}/revoke$"), "device.revoke"),
    ("DELETE", re.compile(re.escape(API) + rf"/devices/{_ID}$"), "device.remove"),
]
_SECRET = re.compile(r"token|secret|password|credential|authorization|private|key$", re.I)
REDACTED = "[redacted]"
_MAX_BODY = 64 * 1024  # JSON bodies kept as arguments (rollouts, enrollments are a few hundred bytes)
_MAX_TEXT = 2000


def redact(value: Any) -> Any:
    """`value` with the values of secret-sounding keys replaced, at any depth."""
    if isinstance(value, dict):
        return {k: REDACTED if _SECRET.search(str(k)) else redact(v) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v) for v in value]
    return value


class AuditTrail:
    """The audit table: `record` appends, `entries` reads; there is nothing else."""

    def __init__(self, db: Database):
        self.db = db

    def record(self, who: str, action: str, arguments: dict[str, Any], status: int, result: str,
               at: float | None = None) -> None:
        with self.db.transaction() as session:
            session.add(AuditRow(at=time.time() if at is None else at, who=who[:128], action=action[:64],
                                 arguments=redact(arguments), status=status, result=result[:_MAX_TEXT]))

    def entries(self, limit: int = 100, after: int = 0) -> list[AuditEntry]:
        """The newest `limit` entries past id `after`, oldest first."""
        with self.db.transaction() as session:
            rows = session.scalars(select(AuditRow).where(AuditRow.id > after)
                                   .order_by(AuditRow.id.desc()).limit(limit)).all()
        return [AuditEntry(id=r.id, at=r.at, who=r.who, action=r.action, arguments=r.arguments or {},
                           status=r.status, result=r.result) for r in reversed(rows)]


def identity(authorization: str, token: str | None) -> str:
    """Who a request's Authorization header says it is (see the module's docstring)."""
    if token is None:
        return "anonymous"
    if not authorization:
        return "unauthenticated"
    if hmac.compare_digest(authorization.encode(), f"Bearer {token}".encode()):
        return "operator"
    given = authorization.partition(" ")[2].strip() or authorization
    return f"unknown {hashlib.sha256(given.encode()).hexdigest()[:12]}"


class AuditMiddleware:
    """Records each audited request (see the module's docstring); passes every other one through."""

    def __init__(self, app: ASGIApp, trail: AuditTrail, token: str | None):
        self.app, self.trail, self.token = app, trail, token

    def _action(self, scope: Scope) -> tuple[str, dict[str, Any]] | None:
        for method, pattern, action in AUDITED:
            if scope["method"] == method and (found := pattern.match(scope["path"])):
                ids = found.groupdict()
                verb = ids.pop("verb", None)
                arguments = {"id": ids["id"]} if "id" in ids else {}
                return action.format(verb=verb), arguments
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        audited = self._action(scope) if scope["type"] == "http" else None
        if audited is None:
            await self.app(scope, receive, send)
            return
        action, arguments = audited
        state = scope.setdefault("state", {})
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        json_body = headers.get("content-type", "").startswith("application/json")
        body = bytearray()
        held: list[Message] = []

        async def reading() -> Message:
            message = await receive()
            if json_body and message["type"] == "http.request" and len(body) < _MAX_BODY:
                body.extend(message.get("body", b"")[: _MAX_BODY - len(body)])
            return message

        async def holding(message: Message) -> None:
            held.append(message)  # sent once the entry is written (answers here are small JSON)

        try:
            await self.app(scope, reading, holding)
        finally:
            status, answer = _answered(held)
            arguments.update(_json(bytes(body)) if body else {})
            arguments.update(state.get("audit_arguments", {}))
            result = str(state.get("audit_result") or (answer if status >= 400 else "done"))
            try:
                await run_in_threadpool(self.trail.record, identity(headers.get("authorization", ""), self.token),
                                        action, arguments, status, result)
            except Exception:  # the action happened (or was refused); the answer must still leave
                log.exception("the audit entry of %s %s could not be written", action, arguments)
            for message in held:
                await send(message)


def _answered(messages: list[Message]) -> tuple[int, str]:
    """The status of an answer, and its `error` (or FastAPI's `detail`) when it has one."""
    status = next((m["status"] for m in messages if m["type"] == "http.response.start"), 500)
    text = b"".join(m.get("body", b"") for m in messages if m["type"] == "http.response.body")
    doc = _json(text[:_MAX_BODY])
    why = doc.get("error") or doc.get("detail") if doc else None
    return status, (why if isinstance(why, str) else json.dumps(why) if why else text[:200].decode(errors="replace"))


def _json(data: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return {}
    return doc if isinstance(doc, dict) else {"body": doc}
