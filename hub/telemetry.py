"""Telemetry storage and the counters of malformed inbound payloads.

Telemetry arrives in batches from the ingest worker and is inserted with one
statement per batch; ``(device_id, seq)`` is unique, so a redelivered window is
dropped by the database (``ON CONFLICT DO NOTHING``) rather than counted twice.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Final, TypeVar

from sqlalchemy import Float, delete, func
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeEngine
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
_TELEMETRY_INSERTS: dict[str, tuple[str, Callable[[datetime], Any]]] = {}


@dataclass(frozen=True)
class TelemetryIn:
    """One validated telemetry window to store.

    ``payload_json``, when given, is stored as the row's ``payload`` instead of
    re-serialising ``report``: the ingest worker passes the text it received when that
    is provably the same document (``hub.mqtt_ingest._telemetry_as_received``), which
    saves a serialisation per message.
    """

    device_id: str
    report: protocol.Telemetry
    received: datetime
    payload_json: str | None = None


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
    """Insert a batch of telemetry windows; duplicates of stored ones are dropped.

    Raises:
        sqlalchemy.exc.SQLAlchemyError: the database refused the batch.
        NotImplementedError: a database other than SQLite or PostgreSQL.
    """
    if not batch:
        return
    conn = session.connection()
    sql, received = _telemetry_insert(conn.dialect)
    rows = []
    for t in batch:
        r = t.report
        lat = r.latency
        rows.append((
            t.device_id, r.seq, r.window_start, r.window_end, r.model, r.inference_count, r.error_count,
            lat.p50_ms, lat.p95_ms, r.rss_bytes, received(t.received),
            r.model_dump_json() if t.payload_json is None else t.payload_json,
        ))
    conn.exec_driver_sql(sql, rows)


_TELEMETRY_COLUMNS: Final = ("device_id", "seq", "window_start", "window_end", "model", "inference_count",
                             "error_count", "p50_ms", "p95_ms", "rss_bytes", "received", "payload")


def _telemetry_insert(dialect: Dialect) -> tuple[str, Callable[[datetime], Any]]:
    """The driver-level ``INSERT ... ON CONFLICT DO NOTHING`` for telemetry rows (run as
    the driver's ``executemany`` on tuples), and the function that turns ``received``
    into the value bound for it.

    Rows go to the DBAPI driver without SQLAlchemy's per-row parameter processing,
    which cost about as much as the insert itself at thousands of rows a second. Only
    ``received`` needs a conversion (the column type's own bind processor: UTC, naive
    on SQLite); ``payload`` is bound as JSON text (already serialised, or the payload
    as received, see :class:`TelemetryIn`), cast to JSON on PostgreSQL.
    """
    cached = _TELEMETRY_INSERTS.get(dialect.name)
    if cached is not None:
        return cached
    if dialect.paramstyle == "qmark":
        mark = "?"
    elif dialect.paramstyle in ("format", "pyformat"):
        mark = "%s"
    else:
        raise NotImplementedError(f"telemetry insert: paramstyle {dialect.paramstyle!r} of {dialect.name}")
    cols = _TELEMETRY_TABLE.c
    for name in _TELEMETRY_COLUMNS:
        # The tuples carry the report's values as they are: pydantic made the float
        # fields floats (what Float's bind processor would make them), and no other
        # column but ``received`` converts its values on these backends.
        typ = cols[name].type
        if name not in ("received", "payload") and not isinstance(typ, Float) and _bind_processor(typ, dialect):
            raise NotImplementedError(f"telemetry insert: column {name} needs a bind processor on {dialect.name}")
    proc = _bind_processor(cols["received"].type, dialect)
    received: Callable[[datetime], Any] = proc if proc is not None else (lambda d: d)
    payload = f"CAST({mark} AS JSON)" if dialect.name == "postgresql" else mark
    marks = ", ".join([mark] * (len(_TELEMETRY_COLUMNS) - 1) + [payload])
    sql = (f"INSERT INTO {_TELEMETRY_TABLE.name} ({', '.join(_TELEMETRY_COLUMNS)}) VALUES ({marks}) "
           "ON CONFLICT (device_id, seq) DO NOTHING")
    _TELEMETRY_INSERTS[dialect.name] = (sql, received)
    return sql, received


def _bind_processor(typ: TypeEngine[Any], dialect: Dialect) -> Callable[[Any], Any] | None:
    """What SQLAlchemy itself applies to a value of ``typ`` bound on ``dialect``."""
    return typ.dialect_impl(dialect).bind_processor(dialect)


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
