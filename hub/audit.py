"""The audit log: who did what, when, to what, and why. Append-only.

Every operator action (campaign create and commands) and every campaign transition
(including the engine's own, with actor ``hub``) is written in the same transaction
as the change it records, so the log never claims something that did not happen,
nor misses something that did.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlmodel import Session, col, select

from hub.models import AuditEntry, AuditEntryPublic, utcnow

__all__ = ["ENGINE_ACTOR", "record", "query"]

ENGINE_ACTOR = "hub"


def record(
    session: Session,
    *,
    actor: str,
    action: str,
    campaign_id: str | None = None,
    target: str | None = None,
    reason: str | None = None,
    detail: dict[str, Any] | None = None,
    ts: datetime | None = None,
) -> AuditEntry:
    """Add one entry to ``session`` (committed with the caller's transaction)."""
    entry = AuditEntry(
        ts=ts or utcnow(),
        actor=actor[:64],
        action=action[:64],
        campaign_id=campaign_id,
        target=target[:200] if target else None,
        reason=reason,
        detail=detail or {},
    )
    session.add(entry)
    return entry


def query(
    session: Session,
    *,
    campaign_id: str | None = None,
    action: str | None = None,
    actor: str | None = None,
    since: datetime | None = None,
    limit: int = 1000,
) -> list[AuditEntryPublic]:
    """Entries matching every filter given, oldest first (the last ``limit`` of them)."""
    q = select(AuditEntry)
    if campaign_id is not None:
        q = q.where(AuditEntry.campaign_id == campaign_id)
    if action is not None:
        q = q.where(AuditEntry.action == action)
    if actor is not None:
        q = q.where(AuditEntry.actor == actor)
    if since is not None:
        q = q.where(col(AuditEntry.ts) >= since)
    rows = session.exec(q.order_by(col(AuditEntry.id).desc()).limit(limit)).all()
    return [AuditEntryPublic.model_validate(r, from_attributes=True) for r in reversed(rows)]
