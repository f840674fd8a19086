"""The hub's database tables and their public (API) shapes.

Families follow the FastAPI full-stack template: ``XBase`` holds shared fields,
``X(table=True)`` the row, ``XPublic`` what the API returns and ``XCreate`` what it
accepts. Every table works on SQLite and PostgreSQL; the schema is created by the
Alembic migrations in ``hub/migrations`` (never ``create_all``), so a change here
needs a new revision.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from pydantic import Field as PydanticField
from sqlalchemy.types import TypeDecorator
from sqlmodel import JSON, Column, Field, SQLModel

__all__ = [
    "UTCDateTime",
    "utcnow",
    "ModelVersion",
    "BundleBase",
    "Bundle",
    "BundlePublic",
    "ModelVersionPublic",
    "ModelPublic",
    "DeviceBase",
    "Device",
    "DevicePublic",
    "DeploymentCreate",
    "DeploymentBase",
    "Deployment",
    "DeploymentDeviceBase",
    "DeploymentDevice",
    "DeploymentDevicePublic",
    "DeploymentPublic",
    "TelemetryBase",
    "Telemetry",
    "TelemetryPublic",
    "PayloadErrorCount",
    "PayloadErrorsPublic",
    "DriftSketchRow",
    "Campaign",
    "CampaignDevice",
    "AuditEntry",
    "AuditEntryPublic",
]


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite stores them naive)."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def utcnow() -> datetime:
    return datetime.now(UTC)


def _json(default_factory: Any) -> Any:
    return Field(default_factory=default_factory, sa_column=Column(JSON, nullable=False))


# --------------------------------------------------------------------------- models


class ModelVersion(SQLModel, table=True):
    """One version of a named model; its bundles (one per profile/precision) hang off it."""

    __tablename__ = "model_version"
    __table_args__ = (sa.UniqueConstraint("name", "version", name="uq_model_version"),)

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(max_length=64, index=True)
    version: str = Field(max_length=64)
    created: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class BundleBase(SQLModel):
    name: str = Field(max_length=64, index=True, description="Model name.")
    version: str = Field(max_length=64, description="Semantic version of the model.")
    profile: str = Field(max_length=64, index=True, description="Target firmware profile.")
    format: str = Field(max_length=16, description="onnx or tflite.")
    precision: str = Field(max_length=32, description="fp32, int8-qdq, ...")
    runtime: str = Field(max_length=32, description="Runtime that loads it.")
    size_bytes: int = Field(sa_type=sa.BigInteger, description="Size of the bundle file.")
    target_path: str = Field(max_length=512, description="TUF target path.")
    selected: bool = Field(
        default=False, description="The compiler selected this candidate for its profile."
    )
    created: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class Bundle(BundleBase, table=True):
    """A stored, signed bundle file, content-addressed by its sha256."""

    __table_args__ = (
        sa.UniqueConstraint(
            "name", "version", "profile", "format", "precision", name="uq_bundle_identity"
        ),
    )

    sha256: str = Field(primary_key=True, max_length=64)
    model_version_id: int = Field(foreign_key="model_version.id", index=True)
    manifest: dict[str, Any] = _json(dict)


class BundlePublic(BundleBase):
    sha256: str
    manifest: dict[str, Any] = PydanticField(default_factory=dict)

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.version}"


class ModelVersionPublic(SQLModel):
    name: str
    version: str
    created: datetime
    bundles: list[BundlePublic]


class ModelPublic(SQLModel):
    name: str
    latest: str = PydanticField(description="Highest semantic version.")
    versions: list[ModelVersionPublic] = PydanticField(description="Newest first.")


# --------------------------------------------------------------------------- devices


class DeviceBase(SQLModel):
    device_id: str = Field(primary_key=True, max_length=64)
    profile: str | None = Field(default=None, max_length=64, index=True)
    tags: list[str] = _json(list)
    runtimes: dict[str, str] = _json(dict)
    agent_version: str | None = Field(default=None, max_length=64)
    platform: str | None = Field(default=None, max_length=200)
    online: bool = Field(default=False)
    state: str | None = Field(default=None, max_length=32, description="Lifecycle state.")
    outcome: str | None = Field(default=None, max_length=32, description="Last outcome.")
    model: str | None = Field(default=None, max_length=200, description="Active name:version.")
    previous_model: str | None = Field(default=None, max_length=200)
    target_model: str | None = Field(default=None, max_length=200)
    deployment_id: str | None = Field(default=None, max_length=64)
    conditions: list[str] = _json(list)
    last_error: str | None = Field(default=None)
    error_kind: str | None = Field(default=None, max_length=64)
    first_seen: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    last_seen: datetime | None = Field(default=None, sa_type=UTCDateTime)
    clock_offset_s: float | None = Field(
        default=None,
        description="Hub clock minus device clock, seconds, from the last live hello "
        "(positive: the device is behind). See hub.fleet.CLOCK_SKEW_TOLERANCE_S.",
    )


class Device(DeviceBase, table=True):
    last_status_seq: int | None = Field(default=None, sa_type=sa.BigInteger)
    last_status_epoch: int | None = Field(
        default=None, sa_type=sa.BigInteger,
        description="The seq_epoch of last_status_seq: the device's spool it was counted in.",
    )
    campaign_id: str | None = Field(
        default=None,
        max_length=64,
        index=True,
        description="The active campaign that owns this device; one at most, by construction.",
    )


class DevicePublic(DeviceBase):
    campaign_id: str | None = None


# --------------------------------------------------------------------------- deployments


class DeploymentCreate(SQLModel):
    model: str = Field(max_length=200, description="NAME:VERSION")
    devices: list[str] = PydanticField(min_length=1, max_length=10_000)
    allow_downgrade: bool = False
    precision: str | None = Field(default=None, max_length=32)
    format: str | None = Field(default=None, max_length=16)
    created_by: str = Field(default="api", max_length=64)


class DeploymentBase(SQLModel):
    model: str = Field(max_length=200, description="NAME:VERSION")
    created: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    created_by: str = Field(max_length=64)
    allow_downgrade: bool = Field(default=False)
    precision: str | None = Field(default=None, max_length=32)
    format: str | None = Field(default=None, max_length=16)


class Deployment(DeploymentBase, table=True):
    id: str = Field(primary_key=True, max_length=64)


class DeploymentDeviceBase(SQLModel):
    device_id: str = Field(primary_key=True, max_length=64)
    bundle_sha256: str | None = Field(default=None, max_length=64)
    target_path: str | None = Field(default=None, max_length=512)
    profile: str | None = Field(default=None, max_length=64)
    precision: str | None = Field(default=None, max_length=32)
    outcome: str = Field(
        max_length=32,
        description="pending, skipped, in_progress, installed, failed, rolled_back, rejected.",
    )
    state: str | None = Field(default=None, max_length=32, description="Lifecycle state.")
    progress: float | None = None
    error: str | None = None
    updated: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class DeploymentDevice(DeploymentDeviceBase, table=True):
    __tablename__ = "deployment_device"

    deployment_id: str = Field(foreign_key="deployment.id", primary_key=True, max_length=64)


class DeploymentDevicePublic(DeploymentDeviceBase):
    pass


class DeploymentPublic(DeploymentBase):
    id: str
    devices: list[DeploymentDevicePublic]
    counts: dict[str, int] = PydanticField(description="Devices by outcome.")


# --------------------------------------------------------------------------- telemetry


class TelemetryBase(SQLModel):
    device_id: str = Field(max_length=64, index=True)
    seq: int = Field(sa_type=sa.BigInteger)
    window_start: float
    window_end: float
    model: str | None = Field(default=None, max_length=200)
    inference_count: int = Field(sa_type=sa.BigInteger)
    error_count: int = Field(sa_type=sa.BigInteger)
    p50_ms: float | None = None
    p95_ms: float | None = None
    rss_bytes: int | None = Field(default=None, sa_type=sa.BigInteger)
    received: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime, index=True)


class Telemetry(TelemetryBase, table=True):
    __table_args__ = (sa.UniqueConstraint("device_id", "seq", name="uq_telemetry_device_seq"),)

    id: int | None = Field(
        default=None,
        sa_column=Column(sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True),
    )
    payload: dict[str, Any] = _json(dict)


class TelemetryPublic(TelemetryBase):
    payload: dict[str, Any]


# --------------------------------------------------------------------------- payload errors


class PayloadErrorCount(SQLModel, table=True):
    """Malformed inbound MQTT payloads, counted by topic kind and error kind."""

    __tablename__ = "payload_error_count"

    topic_kind: str = Field(primary_key=True, max_length=32)
    kind: str = Field(primary_key=True, max_length=32)
    count: int = Field(default=0, sa_type=sa.BigInteger)
    last_error: str | None = None
    last_device_id: str | None = Field(default=None, max_length=64)
    updated: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class PayloadErrorsPublic(SQLModel):
    total: int
    by_kind: dict[str, int]
    by_topic: dict[str, dict[str, int]]


# --------------------------------------------------------------------------- drift sketches


class DriftSketchRow(SQLModel, table=True):
    """One device's :class:`agent.sketch.DriftSketch` for one window of one model.

    ``(device_id, model, window_start)`` is unique, so a redelivered sketch is dropped.
    ``sketch`` holds the validated message as JSON; :mod:`hub.drift` merges them.
    """

    __tablename__ = "drift_sketch"
    __table_args__ = (
        sa.UniqueConstraint("device_id", "model", "window_start", name="uq_drift_sketch_window"),
    )

    id: int | None = Field(
        default=None,
        sa_column=Column(sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True),
    )
    device_id: str = Field(max_length=64, index=True)
    model: str = Field(max_length=200, index=True)
    window_start: float
    window_end: float
    rows: int = Field(sa_type=sa.BigInteger)
    received: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime, index=True)
    sketch: dict[str, Any] = _json(dict)


# --------------------------------------------------------------------------- campaigns


class Campaign(SQLModel, table=True):
    """A staged rollout; its life is the state machine in :mod:`hub.rollout`.

    ``waves`` holds the plan (cumulative targets, :class:`hub.rollout.WaveSpec`) and
    ``wave_results`` what each wave's gates measured. ``saves`` counts state saves,
    capped like the agent's lifecycle.
    """

    id: str = Field(primary_key=True, max_length=64)
    model: str = Field(max_length=200, description="NAME:VERSION rolled out.")
    selector: str = Field(max_length=2000)
    state: str = Field(max_length=32, index=True)
    reason: str | None = Field(default=None, description="Why the last transition happened.")
    waves: list[dict[str, Any]] = _json(list)
    soak_s: float = Field(default=0.0)
    gates: list[dict[str, Any]] = _json(list)
    approve_waves: bool = Field(default=False)
    rate_per_min: int | None = Field(default=None)
    on_fail: str = Field(default="pause", max_length=16)
    precision: str | None = Field(default=None, max_length=32)
    format: str | None = Field(default=None, max_length=16)
    wave_index: int = Field(default=0)
    wave_started: datetime | None = Field(default=None, sa_type=UTCDateTime)
    soak_started: datetime | None = Field(default=None, sa_type=UTCDateTime)
    wave_results: list[dict[str, Any]] = _json(list)
    saves: int = Field(default=0)
    created: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    created_by: str = Field(max_length=64)
    updated: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class CampaignDevice(SQLModel, table=True):
    """One device's place in a campaign (states: :class:`hub.rollout.DeviceState`)."""

    __tablename__ = "campaign_device"

    campaign_id: str = Field(foreign_key="campaign.id", primary_key=True, max_length=64)
    device_id: str = Field(primary_key=True, max_length=64)
    wave: int = Field(index=True)
    state: str = Field(max_length=32, index=True)
    from_model: str | None = Field(default=None, max_length=200)
    bundle_sha256: str | None = Field(default=None, max_length=64)
    target_path: str | None = Field(default=None, max_length=512)
    deployment_id: str | None = Field(default=None, max_length=64)
    rollback_deployment_id: str | None = Field(default=None, max_length=64)
    published: bool = Field(default=False, description="The current deployment reached the broker.")
    joined_late: bool = Field(default=False)
    started: datetime | None = Field(default=None, sa_type=UTCDateTime)
    finished: datetime | None = Field(default=None, sa_type=UTCDateTime)
    detail: str | None = Field(default=None)
    updated: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


# --------------------------------------------------------------------------- audit


class AuditEntryBase(SQLModel):
    ts: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime, index=True)
    actor: str = Field(max_length=64, description="Operator name, or 'hub' for the engine.")
    action: str = Field(max_length=64, index=True, description="What was done.")
    campaign_id: str | None = Field(default=None, max_length=64, index=True)
    target: str | None = Field(default=None, max_length=200, description="What it was done to.")
    reason: str | None = Field(default=None, description="Why.")
    detail: dict[str, Any] = _json(dict)


class AuditEntry(AuditEntryBase, table=True):
    """Append-only: every operator action and every campaign transition."""

    __tablename__ = "audit_entry"

    id: int | None = Field(
        default=None,
        sa_column=Column(sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True),
    )


class AuditEntryPublic(AuditEntryBase):
    id: int
