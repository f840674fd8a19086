"""Telemetry storage and the counters of malformed inbound payloads.

Telemetry arrives in batches from the ingest worker and is inserted with one
statement per batch; ``(device_id, seq)`` is unique, so a redelivered window is
dropped by the database (``ON CONFLICT DO NOTHING``) rather than counted twice.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TypeVar

from sqlalchemy import JSON, Text, bindparam, cast, delete, func
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlmodel import Session, col, select

from agent import protocol
from agent.sketch import DriftSketch
from hub.fleet import dialect_insert
from hub.models import (
    DriftSketchRow,
    PayloadErrorCount,
    PayloadErrorsPublic,
    Telemetry,
    TelemetryPublic,
)

P = TypeVar("P", protocol.Telemetry, DriftSketch)

__all__ = [
    "to_hub_clock",
    "TelemetryIn",
    "DriftIn",
    "store_drift",
    "PayloadErrorTally",
    "store_telemetry",
    "query_telemetry",
    "prune_telemetry",
    "add_payload_errors",
    "payload_errors",
]

_TELEMETRY_TABLE = Telemetry.__table__  # type: ignore[attr-defined]
_TELEMETRY_INSERTS: dict[str, Any] = {}


@dataclass(frozen=True)
class TelemetryIn:
    device_id: str
    report: protocol.Telemetry
    received: datetime


@dataclass(frozen=True)
class DriftIn:
    device_id: str
    sketch: DriftSketch
    received: datetime


@dataclass
class PayloadErrorTally:
    """Malformed payloads of one (topic kind, error kind) since the last flush."""

    count: int
    last_error: str
    last_device_id: str | None


def to_hub_clock(msg: P, offset: float) -> P:
    """``msg`` (a telemetry report or a drift sketch) with its device timestamps moved by
    ``offset`` seconds onto the hub's clock; the same object when ``offset`` is 0."""
    if not offset:
        return msg
    update: dict[str, Any] = {
        "window_start": msg.window_start + offset,
        "window_end": msg.window_end + offset,
    }
    if isinstance(msg, DriftSketch):
        update["features"] = [
            f.model_copy(update={"kll_since": f.kll_since + offset}) if f.kll_since is not None else f
            for f in msg.features
        ]
    return msg.model_copy(update=update)


def store_telemetry(session: Session, batch: Sequence[TelemetryIn]) -> None:
    """Insert a batch of telemetry windows; duplicates of stored ones are dropped."""
    if not batch:
        return
    rows = []
    for t in batch:
        r = t.report
        lat = r.latency
        rows.append(
            {
                "device_id": t.device_id,
                "seq": r.seq,
                "window_start": r.window_start,
                "window_end": r.window_end,
                "model": r.model,
                "inference_count": r.inference_count,
                "error_count": r.error_count,
                "p50_ms": lat.p50_ms,
                "p95_ms": lat.p95_ms,
                "rss_bytes": r.rss_bytes,
                "received": t.received,
                "payload_json": r.model_dump_json(),
            }
        )
    session.connection().execute(_telemetry_insert(session.get_bind().dialect.name), rows)


def _telemetry_insert(dialect: str) -> Any:
    """One single-row INSERT ... ON CONFLICT DO NOTHING, run as executemany.

    SQLite then gets ``cursor.executemany`` and PostgreSQL SQLAlchemy's
    "insertmanyvalues" pages, from a statement compiled once and cached. (A multi-row
    ``.values(rows)`` was compiled afresh for every batch, which cost more than the
    insert.) ``payload`` arrives already serialised by pydantic (``payload_json``), which
    is about three times cheaper than ``model_dump`` followed by the JSON type's
    ``json.dumps``; PostgreSQL casts the text to JSON, SQLite stores the text as is.
    """
    stmt = _TELEMETRY_INSERTS.get(dialect)
    if stmt is None:
        text_param = bindparam("payload_json", type_=Text())
        payload = cast(text_param, JSON()) if dialect == "postgresql" else text_param
        ins = (pg_insert if dialect == "postgresql" else sqlite_insert)(_TELEMETRY_TABLE)
        stmt = ins.values(payload=payload).on_conflict_do_nothing(index_elements=["device_id", "seq"])
        _TELEMETRY_INSERTS[dialect] = stmt
    return stmt


def store_drift(session: Session, batch: Sequence[DriftIn]) -> None:
    """Insert a batch of drift sketches; a redelivered window is dropped by the database."""
    if not batch:
        return
    rows = [
        {
            "device_id": d.device_id,
            "model": d.sketch.model,
            "window_start": d.sketch.window_start,
            "window_end": d.sketch.window_end,
            "rows": d.sketch.rows,
            "received": d.received,
            "sketch": d.sketch.model_dump(mode="json", exclude_defaults=True),
        }
        for d in batch
    ]
    ins = dialect_insert(session.get_bind().dialect)(DriftSketchRow).values(rows)
    session.execute(ins.on_conflict_do_nothing(index_elements=["device_id", "model", "window_start"]))


def query_telemetry(
    session: Session, device_id: str | None = None, limit: int = 100
) -> list[TelemetryPublic]:
    """The newest telemetry windows (of one device, or of all), newest first."""
    q = select(Telemetry)
    if device_id is not None:
        q = q.where(Telemetry.device_id == device_id)
    q = q.order_by(col(Telemetry.window_end).desc(), col(Telemetry.seq).desc()).limit(limit)
    return [TelemetryPublic.model_validate(t, from_attributes=True) for t in session.exec(q).all()]


def prune_telemetry(session: Session, now: datetime, retention: timedelta) -> int:
    """Delete telemetry and drift sketches received before ``now - retention``;
    returns how many rows."""
    res = session.execute(delete(Telemetry).where(col(Telemetry.received) < now - retention))
    res2 = session.execute(delete(DriftSketchRow).where(col(DriftSketchRow.received) < now - retention))
    return int(res.rowcount or 0) + int(res2.rowcount or 0)  # type: ignore[attr-defined]


def add_payload_errors(
    session: Session, tallies: dict[tuple[str, str], PayloadErrorTally], now: datetime
) -> None:
    """Add counted malformed payloads to the persistent counters."""
    for (topic_kind, kind), t in sorted(tallies.items()):
        ins = dialect_insert(session.get_bind().dialect)(PayloadErrorCount).values(
            topic_kind=topic_kind,
            kind=kind,
            count=t.count,
            last_error=t.last_error[:2000],
            last_device_id=t.last_device_id,
            updated=now,
        )
        session.execute(
            ins.on_conflict_do_update(
                index_elements=["topic_kind", "kind"],
                set_={
                    "count": PayloadErrorCount.__table__.c.count + ins.excluded.count,  # type: ignore[attr-defined]
                    "last_error": ins.excluded.last_error,
                    "last_device_id": ins.excluded.last_device_id,
                    "updated": ins.excluded.updated,
                },
            )
        )


def payload_errors(session: Session) -> PayloadErrorsPublic:
    """Totals of malformed payloads, by error kind and by topic kind."""
    by_kind: dict[str, int] = {}
    by_topic: dict[str, dict[str, int]] = {}
    for row in session.exec(select(PayloadErrorCount)).all():
        by_kind[row.kind] = by_kind.get(row.kind, 0) + row.count
        by_topic.setdefault(row.topic_kind, {})[row.kind] = row.count
    total = session.exec(select(func.coalesce(func.sum(PayloadErrorCount.count), 0))).one()
    return PayloadErrorsPublic(total=int(total), by_kind=by_kind, by_topic=by_topic)
