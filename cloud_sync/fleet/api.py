"""The fleet server's HTTP API (routes in edgefn/protocol/fleet.py): devices, publishing, rollouts, the TUF
repository devices fetch from, and the fleet page at `/`.

Errors are `{"error": "..."}` (the app's handler): 400 for a request the fleet refuses (bad metadata, an
empty group), 401 without a credential, 403 with one that is not the device's own (a closed server: the
operator's bearer token for publishing, enrolling and rollout changes, each device's own token for its
report and desired state), 404 for what does not exist, 409 for a rollout in the wrong state for the
change asked, 413 for a body over its route's limit (cloud_sync.fleet.limits).
Database work runs on the server's thread pool, never on the event loop.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError
from starlette.datastructures import UploadFile

from cloud_sync.fleet.audit import AuditTrail
from cloud_sync.fleet.db import BundleRow, Database
from cloud_sync.fleet.engine import RolloutEngine
from cloud_sync.fleet.repository import PublishedBundle, TufRepository
from edgefn.errors import FleetError, PublishRefused
from edgefn.protocol.fleet import (
    API,
    MAX_ID,
    METADATA_PATH,
    TARGETS_PATH,
    BundleRecord,
    DeviceReport,
    Enrollment,
    EnrollRequest,
    RolloutRequest,
)

T = TypeVar("T")
MAX_METADATA_FILES = 64
RolloutId = Annotated[int, Path(ge=1, le=MAX_ID)]


def etag(body: str) -> str:
    """The ETag of a desired state's JSON body."""
    return '"' + hashlib.sha256(body.encode()).hexdigest()[:32] + '"'


def _answer(call: Callable[[], T]) -> T:
    """Run a fleet call, its refusals made HTTP errors."""
    try:
        return call()
    except FleetError as exc:  # its status (PublishRefused: 400); none: the server failed
        raise HTTPException(exc.status or 500, str(exc)) from None
    except SQLAlchemyError as exc:
        raise HTTPException(503, f"the fleet database failed: {type(exc).__name__}") from None


def fleet_router(engine: RolloutEngine, repository: TufRepository, db: Database, trail: AuditTrail, *,
                 token: str | None = None) -> APIRouter:
    router = APIRouter()

    def operator(request: Request) -> None:
        """Publishing, enrolling and rollout changes need the operator's bearer token, when the server has one."""
        if token is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            raise HTTPException(401, "this fleet server needs the operator's bearer token (Authorization: "
                                "Bearer ...)", headers={"WWW-Authenticate": "Bearer"})

    write = [Depends(operator)]

    # --- devices -------------------------------------------------------------------------------------

    @router.post(API + "/devices/{device_id}/report")
    def report(device_id: str, body: DeviceReport, request: Request) -> Response:
        given = bearer(request)
        return _desired_response(_answer(lambda: engine.report(device_id, body, token=given)).model_dump_json())

    @router.get(API + "/devices/{device_id}/desired")
    def desired(device_id: str, request: Request) -> Response:
        given = bearer(request)
        body = _answer(lambda: engine.desired(device_id, token=given)).model_dump_json()
        tag = etag(body)
        if tag in {t.strip().removeprefix("W/") for t in request.headers.get("if-none-match", "").split(",")}:
            return Response(status_code=304, headers={"ETag": tag})
        return _desired_response(body, tag)

    @router.get(API + "/devices")
    def devices() -> dict[str, Any]:
        return {"devices": [d.model_dump() for d in _answer(engine.devices)]}

    @router.delete(API + "/devices/{device_id}", dependencies=write)
    def remove(device_id: str, request: Request) -> dict[str, Any]:
        _answer(lambda: engine.remove(device_id))
        request.state.audit_result = f"removed {device_id}"
        return {"device_id": device_id, "removed": True}

    @router.get(API + "/audit")
    def audit(limit: Annotated[int, Query(ge=1, le=10_000)] = 100,
              after: Annotated[int, Query(ge=0)] = 0) -> dict[str, Any]:
        return {"entries": [e.model_dump() for e in _answer(lambda: trail.entries(limit, after))]}

    @router.post(API + "/enrollments", dependencies=write)
    def enroll(body: EnrollRequest, request: Request) -> JSONResponse:
        credential = _answer(lambda: engine.enroll(body.device_id, body.group))
        request.state.audit_result = f"enrolled {body.device_id} in {body.group} (its token shown once)"
        return JSONResponse(Enrollment(device_id=body.device_id, group=body.group, token=credential).model_dump(),
                            status_code=201, headers={"Cache-Control": "no-store"})

    @router.post(API + "/enrollments/{device_id}/revoke", dependencies=write)
    def revoke(device_id: str, request: Request) -> dict[str, Any]:
        _answer(lambda: engine.revoke(device_id))
        request.state.audit_result = f"revoked {device_id}'s credential"
        return {"device_id": device_id, "revoked": True}

    # --- releases ------------------------------------------------------------------------------------

    @router.post(API + "/publish", dependencies=write)
    async def publish(request: Request) -> dict[str, Any]:
        form = await request.form(max_files=MAX_METADATA_FILES + 1)
        try:
            bundles = [p for p in form.getlist("bundle") if isinstance(p, UploadFile)]
            metadata = [p for p in form.getlist("metadata") if isinstance(p, UploadFile)]
            if len(bundles) > 1:
                raise HTTPException(400, "one bundle per publish")
            if not metadata and not bundles:
                raise HTTPException(400, "nothing to publish: send a `bundle` part and `metadata` parts")
            request.state.audit_arguments = {"bundle": bundles[0].filename if bundles else None,
                                             "metadata": [p.filename for p in metadata]}
            files = [(p.filename or "", await p.read()) for p in metadata]
            bundle = bundles[0].file if bundles else None
            stored, published = await run_in_threadpool(
                lambda: _answer(lambda: repository.publish(files, bundle, lambda b: _record(db, b))))
        finally:
            await form.close()
        request.state.audit_result = (f"published {published.name} {published.version} (sha256 "
                                      f"{published.sha256[:12]}...)" if published else f"stored {', '.join(stored)}")
        return {"metadata": stored, "bundle": published.__dict__ if published else None}

    @router.get(API + "/bundles")
    def bundles() -> dict[str, Any]:
        with db.transaction() as session:
            rows = session.scalars(select(BundleRow).order_by(BundleRow.name, BundleRow.published)).all()
        return {"bundles": [BundleRecord(name=r.name, version=r.version, target=r.target, sha256=r.sha256,
                                         size=r.size, published=r.published).model_dump() for r in rows]}

    # --- rollouts ------------------------------------------------------------------------------------

    @router.post(API + "/rollouts", dependencies=write)
    def create(body: RolloutRequest, request: Request) -> JSONResponse:
        made = _answer(lambda: engine.create(body))
        request.state.audit_result = f"rollout {made.id}: {made.bundle} {made.version} to {made.group}"
        return JSONResponse(made.model_dump(), status_code=201)

    @router.get(API + "/rollouts")
    def rollouts() -> dict[str, Any]:
        return {"rollouts": [r.model_dump() for r in _answer(engine.rollouts)]}

    @router.get(API + "/rollouts/{rollout_id}")
    def rollout(rollout_id: RolloutId) -> dict[str, Any]:
        return _answer(lambda: engine.rollout(rollout_id)).model_dump()

    actions: dict[str, Callable[[int], Any]] = {"pause": engine.pause, "resume": engine.resume, "abort": engine.abort}

    @router.post(API + "/rollouts/{rollout_id}/{action}", dependencies=write)
    def change(rollout_id: RolloutId, action: str, request: Request) -> dict[str, Any]:
        if action not in actions:
            raise HTTPException(404, f"no action {action!r} (pause, resume, abort)")
        changed = _answer(lambda: actions[action](rollout_id))
        request.state.audit_result = f"rollout {rollout_id} {changed.state}"
        return changed.model_dump()

    # --- the TUF repository ----------------------------------------------------------------------------

    @router.get(METADATA_PATH + "{name}")
    def metadata_file(name: str) -> Response:
        path = repository.metadata_file(name)
        if path is None:
            raise HTTPException(404, f"no metadata {name!r}")
        # timestamp.json changes under the same name: a client must never be given a cached one.
        cache = "no-cache" if name in ("timestamp.json", "root.json") else "public, max-age=31536000, immutable"
        return FileResponse(path, media_type="application/json", headers={"Cache-Control": cache})

    @router.get(TARGETS_PATH + "{name}")
    def target_file(name: str) -> Response:
        path = repository.target_file(name)
        if path is None:
            raise HTTPException(404, f"no target {name!r}")
        return FileResponse(path, media_type="application/x-tar",
                            headers={"Cache-Control": "public, max-age=31536000, immutable"})

    # --- the fleet page --------------------------------------------------------------------------------

    @router.get("/", response_class=HTMLResponse)
    def page() -> HTMLResponse:
        from cloud_sync.fleet.page import render_page  # the page is its own module; the API does not need it

        return HTMLResponse(render_page(_answer(engine.devices), _answer(engine.rollouts), now=time.time(),
                                        audit=_answer(lambda: trail.entries(20))))

    return router


def bearer(request: Request) -> str | None:
    """The bearer token a request carries, if any."""
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    return value.strip() or None if scheme.lower() == "bearer" else None


def _desired_response(body: str, tag: str | None = None) -> Response:
    """A desired state's JSON body (serialised once), with its ETag."""
    return Response(body, media_type="application/json", headers={"ETag": tag or etag(body)})


def _record(db: Database, bundle: PublishedBundle) -> None:
    """Add the published bundle to the database; the same bundle again is a no-op, other bytes are refused."""
    with db.transaction() as session:
        known = session.scalars(select(BundleRow).where(BundleRow.name == bundle.name,
                                                        BundleRow.version == bundle.version)).first()
        if known is not None:
            if known.sha256 != bundle.sha256:
                raise PublishRefused(f"{bundle.name} {bundle.version} was published already with other contents "
                                     f"(sha256 {known.sha256[:12]}...): give the bundle a new version")
            return
        session.add(BundleRow(name=bundle.name, version=bundle.version, target=bundle.target, sha256=bundle.sha256,
                              size=bundle.size, published=time.time()))
