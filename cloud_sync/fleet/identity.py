"""Who may speak for a device: a credential per device, issued when the operator enrolls it.

    enroll(id, group)   a new random token (shown once, to the operator); the server keeps only its sha256
    verify(id, token)   the enrolled, unrevoked device whose token this is, else a 401/403 FleetError
    revoke(id)          the token no longer works; the device stays listed, and leaves new rollouts

Tokens are 32 random bytes: a digest needs no salt or slow hash to resist guessing, and comparing
digests in constant time keeps their timing from telling anything.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from cloud_sync.fleet.db import EnrollmentRow
from edgefn.errors import FleetError

TOKEN_BYTES = 32


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def enroll(session: Session, insert: Callable[[Any], Any], device_id: str, group: str,
           now: float | None = None) -> str:
    """Enroll the device in `group` (again: a new token, the old one stops working); returns its token.
    `insert` is the database's INSERT (an upsert: two servers enrolling one new id at once both succeed,
    the last token wins)."""
    token = secrets.token_urlsafe(TOKEN_BYTES)
    table = EnrollmentRow.__table__
    values = {"device_id": device_id, "group_name": group, "token_sha256": digest(token), "revoked": False,
              "enrolled": time.time() if now is None else now}
    session.execute(insert(table).values(**values).on_conflict_do_update(
        index_elements=[table.c.device_id], set_={k: v for k, v in values.items() if k != "device_id"}))
    return token


def revoke(session: Session, device_id: str) -> None:
    row = session.get(EnrollmentRow, device_id, with_for_update=True)
    if row is None:
        raise FleetError(f"device {device_id!r} is not enrolled", status=404)
    row.revoked = True


def verify(session: Session, device_id: str, token: str | None) -> EnrollmentRow:
    """The device's enrollment, when `token` is its credential; 401 without one, 403 with a wrong one."""
    if not token:
        raise FleetError(f"device {device_id}: no device credential (Authorization: Bearer <its token from "
                         "`edgefn fleet devices enroll`)", status=401)
    row = session.get(EnrollmentRow, device_id)
    if row is None or row.revoked or not hmac.compare_digest(row.token_sha256, digest(token)):
        # One answer for unknown, revoked and wrong: a stranger learns nothing about which ids exist.
        raise FleetError(f"device {device_id}: credential refused (not enrolled, revoked, or not its token)",
                         status=403)
    return row


def enrolled_ids(session: Session, group: str) -> set[str]:
    """The devices enrolled in `group` and not revoked."""
    return set(session.scalars(select(EnrollmentRow.device_id).where(EnrollmentRow.group == group,
                                                                     EnrollmentRow.revoked.is_(False))))
