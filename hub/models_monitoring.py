"""Tables of the hub's monitoring: per-model policies, labelled feedback, alerts,
retraining episodes, the webhook outbox and captured samples (``0004_captured_samples``).

Kept apart from :mod:`hub.models` so monitoring can evolve on its own; importing
this module registers the tables on ``SQLModel.metadata`` (Alembic revision
``0003_monitoring``). Deduplication of open alerts and active retraining episodes
is enforced by the database: ``open_key`` is unique and set only while the row is
open (NULLs never collide on SQLite or PostgreSQL), so two evaluators racing cannot
open the same alert twice.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlmodel import JSON, Column, Field, SQLModel

from hub.models import UTCDateTime, utcnow

__all__ = [
    "MonitoringPolicyRow",
    "Feedback",
    "AlertBase",
    "Alert",
    "AlertPublic",
    "RetrainEpisodeBase",
    "RetrainEpisode",
    "RetrainEpisodePublic",
    "WebhookDelivery",
    "CapturedSampleBase",
    "CapturedSample",
    "CapturedSamplePublic",
]


def _json(default_factory: Any) -> Any:
    return Field(default_factory=default_factory, sa_column=Column(JSON, nullable=False))


def _bigint_pk() -> Any:
    return Field(
        default=None,
        sa_column=Column(sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True),
    )


class MonitoringPolicyRow(SQLModel, table=True):
    """Per-model monitoring policy (``hub.monitoring.MonitoringPolicy`` as JSON)."""

    __tablename__ = "monitoring_policy"

    name: str = Field(primary_key=True, max_length=64, description="Model name.")
    policy: dict[str, Any] = _json(dict)
    updated: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class Feedback(SQLModel, table=True):
    """One labelled prediction sent back for performance monitoring."""

    __tablename__ = "monitoring_feedback"
    __table_args__ = (
        sa.UniqueConstraint("model_name", "model_version", "request_id", name="uq_feedback_request"),
        sa.Index("ix_feedback_model_ts", "model_name", "model_version", "ts"),
    )

    id: int | None = _bigint_pk()
    model_name: str = Field(max_length=64)
    model_version: str = Field(max_length=64)
    device_id: str | None = Field(default=None, max_length=64)
    request_id: str | None = Field(default=None, max_length=128)
    ts: float = Field(description="When the prediction was made (seconds); picks the window.")
    label: Any = Field(sa_column=Column(JSON, nullable=False))
    prediction: Any = Field(sa_column=Column(JSON, nullable=False))
    score: Any = Field(default=None, sa_column=Column(JSON, nullable=True))
    received: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class AlertBase(SQLModel):
    key: str = Field(max_length=400, index=True, description="model|subject|cohort.")
    kind: str = Field(max_length=32, description="drift, performance or staleness.")
    model: str = Field(max_length=200, index=True, description="name:version.")
    subject: str = Field(max_length=160, description="Feature name or metric.")
    cohort: str = Field(max_length=512, description="Canonical cohort selector.")
    severity: str = Field(max_length=16, description="warning or critical.")
    state: str = Field(max_length=16, index=True, description="open or resolved.")
    value: float | None = Field(default=None, description="The statistic that fired (PSI, metric).")
    threshold: float | None = None
    message: str = Field(default="", max_length=2000)
    details: dict[str, Any] = _json(dict)
    opened: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    updated: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    resolved: datetime | None = Field(default=None, sa_type=UTCDateTime)


class Alert(AlertBase, table=True):
    __tablename__ = "monitoring_alert"

    id: int | None = Field(default=None, primary_key=True)
    open_key: str | None = Field(default=None, max_length=400, unique=True)


class AlertPublic(AlertBase):
    id: int


class RetrainEpisodeBase(SQLModel):
    key: str = Field(max_length=400, index=True)
    model: str = Field(max_length=200, index=True, description="name:version.")
    reason: str = Field(max_length=32, description="drift or performance.")
    cohort: str = Field(max_length=512)
    state: str = Field(max_length=16, description="active or ended.")
    details: dict[str, Any] = _json(dict)
    started: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    ended: datetime | None = Field(default=None, sa_type=UTCDateTime)


class RetrainEpisode(RetrainEpisodeBase, table=True):
    """One episode of a retraining condition; the trigger fires when it starts."""

    __tablename__ = "monitoring_retrain_episode"

    id: int | None = Field(default=None, primary_key=True)
    open_key: str | None = Field(default=None, max_length=400, unique=True)


class RetrainEpisodePublic(RetrainEpisodeBase):
    id: int


class WebhookDelivery(SQLModel, table=True):
    """Outbox of notifications: webhooks (and the retrain command), retried until done."""

    __tablename__ = "monitoring_delivery"
    __table_args__ = (sa.Index("ix_delivery_due", "state", "next_attempt"),)

    id: int | None = _bigint_pk()
    event: str = Field(max_length=32, description="alert.opened, alert.resolved, retrain, ...")
    target: str = Field(max_length=2000, description="Webhook URL, or 'command'.")
    payload: dict[str, Any] = _json(dict)
    state: str = Field(default="pending", max_length=16, description="pending, delivered, failed.")
    attempts: int = Field(default=0)
    next_attempt: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    last_error: str | None = Field(default=None, max_length=2000)
    created: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    delivered: datetime | None = Field(default=None, sa_type=UTCDateTime)


class CapturedSampleBase(SQLModel):
    device_id: str = Field(max_length=64, description="Device that captured it.")
    sample_id: str = Field(max_length=64, description="The device's id of the sample.")
    model_name: str = Field(max_length=64)
    model_version: str = Field(max_length=64)
    ts: float = Field(description="When the request was served (device clock, seconds).")
    size: int = Field(description="Bytes of the stored sample frame.")
    sha256: str = Field(max_length=64, description="sha256 of the npz data.")
    received: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class CapturedSample(CapturedSampleBase, table=True):
    """One raw sample a device captured and uploaded (opt-in on the device)."""

    __tablename__ = "captured_sample"
    __table_args__ = (
        sa.UniqueConstraint("device_id", "sample_id", name="uq_capture_device_sample"),
        sa.Index("ix_capture_model_ts", "model_name", "model_version", "ts"),
    )

    id: int | None = _bigint_pk()


class CapturedSamplePublic(CapturedSampleBase):
    id: int
