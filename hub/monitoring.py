"""Fleet monitoring service: drift, performance, staleness and operations.

Transport-free: REST routes (:mod:`hub.api_monitoring`), the CLI and the alert loop
(:mod:`hub.alerts`) call these functions with a database session. The statistics
themselves are the pure functions of :mod:`hub.drift`; this module only selects
and merges what the database holds:

- **drift** (:func:`drift_query`): stored device sketches of one model version,
  filtered by cohort (:mod:`hub.selector`) and time window, merged with
  :class:`hub.drift.SketchMerger` (invalid sketches are skipped and counted, never
  merged) and compared with the bundle's ``reference.json``
  (:func:`hub.drift.drift_report`) and, optionally, with a control cohort
  (:func:`hub.drift.compare_cohorts`);
- **performance** (:func:`performance_report`): labelled feedback
  (:func:`ingest_feedback`) per time window, scored by
  :func:`hub.drift.classification_metrics`, with model age and decay;
- **operations** (:func:`operations_report`): latency, throughput, error rate, CPU
  and RSS per device, per model and fleet-wide, from telemetry windows (and the
  sketches' latency histograms for fleet quantiles).

Per-model settings live in :class:`MonitoringPolicy` (drift thresholds, alert and
retraining rules); hub-wide ones in :class:`MonitoringSettings`.
"""

from __future__ import annotations

import json
import logging
import math
import re
import tempfile
import threading
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Literal
from urllib.parse import urlsplit

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import Session, col, select

from agent.bundle import Reference, SemVer, unpack
from agent.errors import BundleError, PayloadError, first_error
from agent.protocol import Feedback as AgentFeedback
from agent.protocol import check_label, check_model_ref, check_score
from agent.sketch import LATENCY_EDGES_MS, DriftSketch
from hub import drift
from hub.db import Database
from hub.errors import HubDataError, InvalidRequest, InvalidSelector, ModelNotFound
from hub.models import Bundle, Device, DriftSketchRow, ModelVersion, Telemetry
from hub.models_monitoring import Feedback, MonitoringPolicyRow
from hub.repository import Repository
from hub.selector import Selector, parse_selector
from hub.telemetry import PayloadErrorTally, add_payload_errors

__all__ = [
    "MonitoringSettings",
    "MonitoringPolicy",
    "PerformanceFloor",
    "InvalidFeedback",
    "PayloadTooLarge",
    "NoReference",
    "parse_duration",
    "parse_model_ref",
    "StoredSketch",
    "load_sketches",
    "sketch_models",
    "ReferenceCache",
    "get_policy",
    "set_policy",
    "DriftResult",
    "drift_query",
    "worst_status",
    "FeedbackItem",
    "FeedbackBatch",
    "FeedbackResult",
    "FeedbackRejects",
    "parse_feedback",
    "ingest_feedback",
    "receive_feedback",
    "device_feedback",
    "WindowMetrics",
    "Staleness",
    "VersionPerformance",
    "PerformanceReport",
    "performance_report",
    "window_metrics",
    "OpsStats",
    "OperationsReport",
    "operations_report",
]

log = logging.getLogger(__name__)

FEEDBACK_TOPIC: Final = "feedback"
_STATUS_RANK: Final = {"ok": 0, "warn": 1, "alert": 2}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
_UNITS: Final = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
MAX_WINDOW_S: Final = 366 * 86400.0


# --------------------------------------------------------------------------- settings


class MonitoringSettings(BaseSettings):
    """Hub-wide monitoring settings (environment: ``EDGEFLEET_MONITORING_*``).

    Webhook URLs and the retraining command are deployment configuration, never
    settable over the API: a command configured through REST would be remote code
    execution.
    """

    model_config = SettingsConfigDict(env_prefix="EDGEFLEET_MONITORING_", extra="forbid")

    interval_s: float = Field(60.0, gt=0, description="How often alert rules are evaluated, seconds.")
    alert_webhooks: list[str] = Field(
        default_factory=list, description="URLs that receive every alert opened, escalated or resolved."
    )
    retrain_webhooks: list[str] = Field(
        default_factory=list, description="URLs that receive retraining triggers."
    )
    retrain_command: list[str] | None = Field(
        None, description="argv run (no shell) on each retraining trigger; the event JSON on stdin."
    )
    command_timeout_s: float = Field(60.0, gt=0, description="Limit on one retrain command run.")
    webhook_timeout_s: float = Field(5.0, gt=0, description="Timeout of one webhook POST.")
    webhook_max_attempts: int = Field(6, ge=1, le=100, description="Attempts before a delivery fails.")
    webhook_backoff_s: float = Field(
        2.0, gt=0, description="First retry delay; doubles per attempt (capped at 1 h)."
    )
    max_feedback_bytes: int = Field(
        1 << 20, ge=1024, description="Largest POST /api/v1/feedback body, bytes."
    )
    max_feedback_items: int = Field(10_000, ge=1, description="Most items in one feedback batch.")
    ops_window_s: float = Field(
        300.0, gt=0, description="Trailing window of the per-model rates exported at /metrics."
    )

    @field_validator("alert_webhooks", "retrain_webhooks")
    @classmethod
    def _urls(cls, v: list[str]) -> list[str]:
        for url in v:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(f"webhook {url!r} is not an http(s) URL")
        return v

    @field_validator("retrain_command")
    @classmethod
    def _argv(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and not v:
            raise ValueError("retrain_command must name a program (or be unset)")
        return v


class PerformanceFloor(BaseModel):
    """Alert (and trigger retraining) when a metric of the latest window falls below ``floor``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    metric: Literal["accuracy", "precision", "recall", "f1", "auc"] = Field(
        "accuracy", description="Metric compared with the floor."
    )
    floor: float = Field(ge=0, le=1, description="Lowest acceptable value.")
    min_samples: int = Field(50, ge=1, description="Labelled rows a window needs to be judged.")


class MonitoringPolicy(BaseModel):
    """Per-model monitoring policy; defaults apply to models without one."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    thresholds: drift.DriftThresholds = Field(
        default_factory=drift.DriftThresholds,
        description="Drift decision thresholds (PSI warn 0.1, alert 0.25, chi-square p 0.01, 200 rows).",
    )
    window_s: float = Field(3600.0, ge=1, le=MAX_WINDOW_S, description="Evaluation window, seconds.")
    alert_on: Literal["warn", "alert"] = Field(
        "warn", description="Lowest drift status that opens an alert (warn: severity warning)."
    )
    cohorts: list[str] = Field(
        default_factory=lambda: ["all"], min_length=1, max_length=32,
        description="Cohort selectors the alert loop evaluates separately.",
    )
    retrain_drift_windows: int = Field(
        3, ge=0, le=1000,
        description="Trigger retraining when some feature is at 'alert' in this many consecutive "
        "windows (0: never).",
    )
    performance: PerformanceFloor | None = Field(
        None, description="Performance floor; falling under it alerts and triggers retraining."
    )
    max_age_days: float | None = Field(
        None, gt=0, description="Alert when a deployed version is older than this (since upload)."
    )

    @field_validator("cohorts")
    @classmethod
    def _cohorts(cls, v: list[str]) -> list[str]:
        out = []
        for text in v:
            try:
                out.append(str(parse_selector(text)))
            except InvalidSelector as e:
                raise ValueError(str(e)) from e
        return list(dict.fromkeys(out))


# --------------------------------------------------------------------------- errors


class InvalidFeedback(HubDataError):
    """A feedback batch that is malformed or names an unknown model (nothing stored)."""

    status_code = 422

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.kind = kind


class PayloadTooLarge(InvalidFeedback):
    """A request body over its byte limit."""

    status_code = 413


class NoReference(HubDataError):
    """The model version has no usable reference (no bundle, or reference.json is empty)."""

    status_code = 409


# --------------------------------------------------------------------------- parsing


def parse_duration(text: str | float | None, default: float = 3600.0) -> float:
    """Seconds in ``"90"``, ``"90s"``, ``"15m"``, ``"1h"``, ``"7d"``, ``"2w"``.

    Raises:
        InvalidRequest: not a duration, zero, or longer than a year.
    """
    if text is None or text == "":
        return default
    if isinstance(text, int | float):
        value = float(text)
    else:
        m = _DURATION.match(text)
        if not m:
            raise InvalidRequest(f"bad duration {text!r} (use e.g. 90s, 15m, 1h, 7d)")
        value = float(m.group(1)) * _UNITS[m.group(2)]
    if not 0 < value <= MAX_WINDOW_S:
        raise InvalidRequest(f"duration must be between 1 s and {MAX_WINDOW_S:.0f} s")
    return value


def parse_model_ref(ref: str) -> tuple[str, str | None]:
    """``NAME`` or ``NAME:VERSION`` -> (name, version or None).

    Raises:
        InvalidRequest: empty name or version.
    """
    name, sep, version = ref.partition(":")
    if not name or (sep and not version):
        raise InvalidRequest(f"bad model reference {ref!r} (NAME or NAME:VERSION)")
    return name, version or None


def _selector(text: str | None) -> Selector:
    """``None`` or blank selects every device (the query default)."""
    return parse_selector(text if text and text.strip() else "all")


@dataclass
class _Unknown:
    """A device that sent sketches or telemetry but has no row (yet)."""

    device_id: str
    profile: str | None = None
    tags: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- sketch source


@dataclass(frozen=True)
class StoredSketch:
    """One device window's drift sketch as stored by the ingest."""

    device_id: str
    model: str
    window_start: float
    window_end: float
    sketch: DriftSketch | None
    error: str | None = None


def load_sketches(
    session: Session, start: float, end: float, *, model: str | None = None
) -> list[StoredSketch]:
    """Stored sketches whose window starts in ``[start, end)``, of one ``name:version``
    or of every model. The one adapter between monitoring and the drift-ingest table.

    A stored payload that no longer decodes comes back with ``sketch=None`` and the
    reason in ``error`` (it is counted as rejected, never merged).
    """
    q = select(DriftSketchRow).where(
        col(DriftSketchRow.window_start) >= start, col(DriftSketchRow.window_start) < end
    )
    if model is not None:
        q = q.where(DriftSketchRow.model == model)
    out: list[StoredSketch] = []
    for row in session.exec(q.order_by(col(DriftSketchRow.id))).all():
        try:
            sk: DriftSketch | None = DriftSketch.decode(json.dumps(row.sketch).encode())
            err = None
        except (PayloadError, TypeError, ValueError) as e:
            sk, err = None, str(e)
        out.append(StoredSketch(row.device_id, row.model, row.window_start, row.window_end, sk, err))
    return out


def sketch_models(session: Session, start: float, end: float) -> list[str]:
    """The ``name:version`` of every model with sketches starting in ``[start, end)``."""
    q = select(DriftSketchRow.model).where(
        col(DriftSketchRow.window_start) >= start, col(DriftSketchRow.window_start) < end
    ).distinct()
    return sorted(session.exec(q).all())


# --------------------------------------------------------------------------- references


class ReferenceCache:
    """``reference.json`` of a model version, read from its stored bundle.

    Bundles are immutable and content-addressed, so references are cached by sha256.
    """

    def __init__(self, repository: Repository, max_entries: int = 256) -> None:
        self._repo = repository
        self._max = max_entries
        self._cache: dict[str, Reference] = {}
        self._lock = threading.Lock()

    def get(self, session: Session, name: str, version: str) -> Reference:
        """The reference of ``name:version`` (selected bundle first, then by sha256).

        Raises:
            ModelNotFound: no bundle of this version.
            NoReference: its bundle cannot be read, or the reference has no features.
        """
        bundles = session.exec(
            select(Bundle).where(Bundle.name == name, Bundle.version == version)
        ).all()
        if not bundles:
            raise ModelNotFound(f"no model {name}:{version}")
        b = sorted(bundles, key=lambda b: (not b.selected, b.sha256))[0]
        with self._lock:
            ref = self._cache.get(b.sha256)
        if ref is None:
            ref = self._read(b.sha256)
            with self._lock:
                if len(self._cache) >= self._max:
                    self._cache.pop(next(iter(self._cache)))
                self._cache[b.sha256] = ref
        if not ref.features and ref.predictions is None:
            raise NoReference(f"{name}:{version} has no reference histograms (reference.json is empty)")
        return ref

    def _read(self, sha256: str) -> Reference:
        path = self._repo.targets_dir / f"{sha256}.efb"
        try:
            with tempfile.TemporaryDirectory(prefix=".ref-", dir=self._repo.targets_dir) as tmp:
                return unpack(path, Path(tmp) / "b").reference()
        except (BundleError, OSError) as e:
            raise NoReference(f"bundle {sha256[:12]} cannot be read: {e}") from e


# --------------------------------------------------------------------------- policies


def get_policy(session: Session, name: str) -> MonitoringPolicy:
    """The stored policy of model ``name``, or the defaults.

    A stored policy that no longer validates (a newer hub wrote it) is logged and
    replaced by the defaults rather than breaking monitoring.
    """
    row = session.get(MonitoringPolicyRow, name)
    if row is None:
        return MonitoringPolicy()
    try:
        return MonitoringPolicy.model_validate(row.policy)
    except ValidationError as e:
        log.error("stored monitoring policy of %s is invalid, using defaults: %s", name, e)
        return MonitoringPolicy()


def set_policy(session: Session, name: str, policy: MonitoringPolicy) -> MonitoringPolicy:
    """Store the policy of model ``name`` (whole replacement).

    Raises:
        ModelNotFound: no version of ``name`` was ever uploaded.
    """
    if session.exec(select(ModelVersion.id).where(ModelVersion.name == name)).first() is None:
        raise ModelNotFound(f"no model named {name!r}")
    row = session.get(MonitoringPolicyRow, name)
    data = policy.model_dump(mode="json")
    if row is None:
        session.add(MonitoringPolicyRow(name=name, policy=data))
    else:
        row.policy = data
        row.updated = datetime.now(UTC)
        session.add(row)
    return policy


# --------------------------------------------------------------------------- drift


class DriftResult(BaseModel):
    """Drift of one model version in one cohort and time window."""

    model: str = Field(description="name:version.")
    name: str
    version: str
    cohort: str = Field(description="Canonical cohort selector.")
    window_start: float
    window_end: float
    window_s: float
    devices: int = Field(description="Devices whose sketches were merged.")
    sketches: int
    rows: int
    rejected: dict[str, int] = Field(description="Stored sketches refused by the merge, by kind.")
    status: Literal["ok", "warn", "alert"] = Field(description="Worst status over features and prediction.")
    thresholds: drift.DriftThresholds
    features: list[drift.FeatureDrift] = Field(description="One object per input feature, reference order.")
    prediction: drift.FeatureDrift | None = Field(None, description="Prediction drift against the reference.")
    control: str | None = Field(None, description="Control cohort selector, when compared.")
    control_devices: int | None = None
    control_features: list[drift.FeatureDrift] | None = Field(
        None, description="Cohort against control, per feature."
    )
    prediction_vs_control: drift.FeatureDrift | None = None

    def rows_with_prediction(self) -> list[drift.FeatureDrift]:
        """Features then the prediction row: exactly :func:`hub.drift.drift_report`'s list."""
        return [*self.features, *([self.prediction] if self.prediction else [])]


def worst_status(rows: Iterable[drift.FeatureDrift]) -> Literal["ok", "warn", "alert"]:
    worst: Literal["ok", "warn", "alert"] = "ok"
    for r in rows:
        if _STATUS_RANK[r.status] > _STATUS_RANK[worst]:
            worst = r.status
    return worst


def _latest_version(session: Session, name: str) -> str:
    versions = session.exec(select(ModelVersion.version).where(ModelVersion.name == name)).all()
    if not versions:
        raise ModelNotFound(f"no model named {name!r}")
    return max(versions, key=SemVer.parse)


def _cohort_devices(session: Session, device_ids: Iterable[str], sel: Selector) -> set[str]:
    ids = sorted(set(device_ids))
    if sel.is_all:
        return set(ids)
    known: dict[str, Device] = {}
    for k in range(0, len(ids), 500):
        q = select(Device).where(col(Device.device_id).in_(ids[k : k + 500]))
        known.update((d.device_id, d) for d in session.exec(q).all())
    return {i for i in ids if sel.matches(known.get(i) or _Unknown(i))}


def _merge(
    stored: Sequence[StoredSketch], devices: set[str], reference: Reference, model: str
) -> tuple[drift.MergedSketch, int]:
    m = drift.SketchMerger(reference, model=model)
    seen: set[str] = set()
    for s in stored:
        if s.device_id not in devices:
            continue
        if s.sketch is None:
            m.rejected["stored_invalid"] += 1
            continue
        if m.offer(s.sketch):
            seen.add(s.device_id)
    return m.result(), len(seen)


def drift_query(
    session: Session,
    references: ReferenceCache,
    name: str,
    version: str | None = None,
    *,
    select_expr: str | None = None,
    window_s: float = 3600.0,
    now: float,
    control: str | None = None,
    thresholds: drift.DriftThresholds | None = None,
    stored: Sequence[StoredSketch] | None = None,
) -> DriftResult:
    """Drift of ``name:version`` (latest version when ``None``) for the devices of
    ``select_expr`` over ``[now - window_s, now)``, against the bundle reference and,
    with ``control``, against that cohort. Thresholds: ``thresholds``, else the model's
    policy. ``stored`` lets callers that evaluate many cohorts load sketches once.

    Raises:
        ModelNotFound: unknown model or version.
        NoReference: the version's bundle has no reference histograms.
        InvalidRequest: a selector does not parse, or ``window_s`` is out of range.
    """
    if not 0 < window_s <= MAX_WINDOW_S:
        raise InvalidRequest("window out of range")
    sel = _selector(select_expr)
    ctl = _selector(control) if control is not None else None
    if version is None:
        version = _latest_version(session, name)
    ref = references.get(session, name, version)
    model = f"{name}:{version}"
    th = thresholds or get_policy(session, name).thresholds
    start = now - window_s
    if stored is None:
        stored = load_sketches(session, start, now, model=model)
    else:
        stored = [s for s in stored if s.model == model and start <= s.window_start < now]
    cohort = _cohort_devices(session, (s.device_id for s in stored), sel)
    merged, n_dev = _merge(stored, cohort, ref, model)
    report = drift.drift_report(ref, merged, th)
    feats = [r for r in report if r.role == "input"]
    pred = next((r for r in report if r.role == "prediction"), None)
    result = DriftResult(
        model=model, name=name, version=version, cohort=str(sel),
        window_start=start, window_end=now, window_s=window_s,
        devices=n_dev, sketches=merged.sketches, rows=merged.rows, rejected=merged.rejected,
        status=worst_status(report), thresholds=th, features=feats, prediction=pred,
    )
    if ctl is not None:
        ctl_devices = _cohort_devices(session, (s.device_id for s in stored), ctl)
        control_merged, n_ctl = _merge(stored, ctl_devices, ref, model)
        if merged.sketches and control_merged.sketches:
            cmp = drift.compare_cohorts(control_merged, merged, th, reference=ref)
        else:
            cmp = []
        result.control = str(ctl)
        result.control_devices = n_ctl
        result.control_features = [r for r in cmp if r.role == "input"]
        result.prediction_vs_control = next((r for r in cmp if r.role == "prediction"), None)
    return result


# --------------------------------------------------------------------------- feedback


_Label = int | str


class FeedbackItem(BaseModel):
    """One labelled prediction. ``request_id`` makes resubmission idempotent."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, frozen=True)

    model: str = Field(min_length=3, max_length=129, description="name:version that predicted.")
    device_id: str | None = Field(None, min_length=1, max_length=64)
    request_id: str | None = Field(None, min_length=1, max_length=128)
    ts: float | None = Field(
        None, ge=0, le=1e11, description="When the prediction was made (seconds); default: now."
    )
    label: _Label = Field(description="True label (int or string).")
    prediction: _Label = Field(description="Predicted label, same type as label.")
    score: float | dict[str, float] | None = Field(
        None,
        description="Binary: score of the greater label. Multi-class: score per label (string keys).",
    )

    @field_validator("label", "prediction")
    @classmethod
    def _label(cls, v: _Label) -> _Label:
        return check_label(v)  # the contract's rules: what a device accepts is stored

    @field_validator("score")
    @classmethod
    def _score(cls, v: float | dict[str, float] | None) -> float | dict[str, float] | None:
        return check_score(v)

    @model_validator(mode="after")
    def _consistent(self) -> FeedbackItem:
        if type(self.label) is not type(self.prediction):
            raise ValueError("label and prediction must have the same type")
        if self.request_id is None and self.ts is None:
            raise ValueError("give request_id or ts")
        check_model_ref(self.model)
        return self


class FeedbackBatch(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    items: list[FeedbackItem] = Field(min_length=1)


class FeedbackResult(BaseModel):
    accepted: int = Field(description="New labelled rows stored.")
    duplicates: int = Field(description="Rows whose request_id was already stored (ignored).")


class _NonFinite(ValueError):
    pass


def _no_constants(name: str) -> Any:
    raise _NonFinite(f"{name} is not a number JSON allows")


def parse_feedback(data: bytes, *, max_bytes: int, max_items: int) -> FeedbackBatch:
    """Parse a feedback body: ``{"items": [...]}`` or a bare list of items.

    Raises:
        PayloadTooLarge: over ``max_bytes`` (kind ``oversized``).
        InvalidFeedback: kind ``not_json``, ``schema`` (types, NaN/inf, missing
            fields, bad labels) or ``too_many`` (over ``max_items``).
    """
    if len(data) > max_bytes:
        raise PayloadTooLarge(f"feedback body of {len(data)} bytes exceeds {max_bytes}", "oversized")
    try:
        obj = json.loads(data, parse_constant=_no_constants)
    except _NonFinite as e:
        raise InvalidFeedback(f"feedback: {e}", "schema") from e
    except (ValueError, RecursionError) as e:
        raise InvalidFeedback(f"feedback is not valid JSON: {e}", "not_json") from e
    if isinstance(obj, list):
        obj = {"items": obj}
    if isinstance(obj, dict) and isinstance(obj.get("items"), list) and len(obj["items"]) > max_items:
        raise InvalidFeedback(f"feedback batch of {len(obj['items'])} items exceeds {max_items}", "too_many")
    try:
        return FeedbackBatch.model_validate(obj)
    except ValidationError as e:
        raise InvalidFeedback(f"feedback: {first_error(e)}", "schema") from e


class FeedbackRejects:
    """Counts rejected feedback by kind, in memory and in ``payload_error_count``
    (topic ``feedback``), so /metrics and ``/api/v1/stats/payload-errors`` show it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts: Counter[str] = Counter()

    def record(self, db: Database, err: InvalidFeedback, now: datetime) -> None:
        with self._lock:
            self.counts[err.kind] += 1
        log.warning("rejected feedback (%s): %s", err.kind, err)
        try:
            with db.session() as s:
                add_payload_errors(s, {(FEEDBACK_TOPIC, err.kind): PayloadErrorTally(1, str(err), None)}, now)
        except SQLAlchemyError:
            log.exception("could not persist the feedback rejection counter")


def ingest_feedback(session: Session, batch: FeedbackBatch, now: float) -> FeedbackResult:
    """Store a validated batch atomically; rows whose (model, request_id) is already
    stored, in the database or earlier in the batch, are skipped and counted.

    Raises:
        InvalidFeedback: (kind ``unknown_model``) an item names a model version the
            registry does not hold; nothing is stored.
    """
    refs = {tuple(i.model.split(":", 1)) for i in batch.items}
    known: set[tuple[str, str]] = set()
    for name in {n for n, _ in refs}:
        for v in session.exec(select(ModelVersion.version).where(ModelVersion.name == name)).all():
            known.add((name, v))
    unknown = sorted(f"{n}:{v}" for n, v in refs - known)
    if unknown:
        raise InvalidFeedback(f"feedback for unknown model {', '.join(unknown[:5])}", "unknown_model")
    ids_by_model: dict[tuple[str, str], set[str]] = {}
    for i in batch.items:
        if i.request_id is not None:
            ids_by_model.setdefault(tuple(i.model.split(":", 1)), set()).add(i.request_id)  # type: ignore[arg-type]
    stored: set[tuple[str, str, str]] = set()
    for (n, v), ids in ids_by_model.items():
        id_list = sorted(ids)
        for k in range(0, len(id_list), 500):
            q = select(Feedback.request_id).where(
                Feedback.model_name == n, Feedback.model_version == v,
                col(Feedback.request_id).in_(id_list[k : k + 500]),
            )
            stored.update((n, v, r) for r in session.exec(q).all() if r is not None)
    accepted = duplicates = 0
    received = datetime.fromtimestamp(now, UTC)
    for i in batch.items:
        n, v = i.model.split(":", 1)
        if i.request_id is not None:
            if (n, v, i.request_id) in stored:
                duplicates += 1
                continue
            stored.add((n, v, i.request_id))
        session.add(
            Feedback(
                model_name=n, model_version=v, device_id=i.device_id, request_id=i.request_id,
                ts=now if i.ts is None else i.ts, label=i.label, prediction=i.prediction,
                score=i.score, received=received,
            )
        )
        accepted += 1
    return FeedbackResult(accepted=accepted, duplicates=duplicates)


def device_feedback(device_id: str, msg: AgentFeedback, clock_offset: float = 0.0) -> FeedbackBatch:
    """A device's labels (MQTT topic ``feedback``) as a feedback batch.

    The device id comes from the topic, never from the payload, and request ids are
    scoped by it (``device_id/request_id``), so two devices cannot collide.
    ``clock_offset`` moves the device's timestamps onto the hub's clock.

    Raises:
        InvalidFeedback: (kind ``schema``) an item breaks a rule the REST path also
            enforces, e.g. a label and prediction of different types.
    """
    items = [
        {
            "model": i.model, "device_id": device_id, "ts": max(0.0, i.ts + clock_offset), "label": i.label,
            "prediction": i.prediction, "score": i.score,
            "request_id": f"{device_id}/{i.request_id}" if i.request_id is not None else None,
        }
        for i in msg.items
    ]
    try:
        return FeedbackBatch.model_validate({"items": items})
    except ValidationError as e:
        raise InvalidFeedback(f"feedback from {device_id}: {first_error(e)}", "schema") from e


# --------------------------------------------------------------------------- performance


class WindowMetrics(BaseModel):
    window_start: float
    window_end: float
    n: int
    accuracy: float | None = None
    precision: float | None = None
    recall: float | None = None
    f1: float | None = None
    auc: float | None = None

    def metric(self, name: str) -> float | None:
        value: float | None = getattr(self, name)
        return value


class Staleness(BaseModel):
    created: datetime | None = Field(description="When the version was first uploaded.")
    age_s: float | None = Field(description="Model age since upload, seconds.")
    metric: str
    first: float | None = Field(description="Metric in the first judged window.")
    last: float | None = Field(description="Metric in the last judged window.")
    decay: float | None = Field(description="first - last (positive: the model got worse).")
    slope_per_day: float | None = Field(description="Least-squares trend of the metric, per day.")


class VersionPerformance(BaseModel):
    version: str
    overall: WindowMetrics
    windows: list[WindowMetrics]
    staleness: Staleness


class PerformanceReport(BaseModel):
    name: str
    window_s: float
    periods: int
    versions: list[VersionPerformance]


def _labels(values: list[Any]) -> np.ndarray:
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return np.asarray(values, dtype=np.int64)
    return np.asarray([str(v) for v in values], dtype=object).astype(str)


def window_metrics(rows: Sequence[Feedback], start: float, end: float) -> WindowMetrics:
    """Metrics of feedback rows (all assumed inside ``[start, end)``) via
    :func:`hub.drift.classification_metrics`. AUC needs a score on every row: binary
    floats (score of the greater label) or per-label maps."""
    if not rows:
        return WindowMetrics(window_start=start, window_end=end, n=0)
    y_true = _labels([r.label for r in rows])
    y_pred = _labels([r.prediction for r in rows])
    if y_true.dtype != y_pred.dtype:
        y_true, y_pred = y_true.astype(str), y_pred.astype(str)
    scores = _score_matrix(rows, y_true)
    try:
        m = drift.classification_metrics(y_true, y_pred, scores)
    except ValueError:  # scores of the wrong shape for the labels present
        m = drift.classification_metrics(y_true, y_pred)
    return WindowMetrics(
        window_start=start, window_end=end, n=m.n, accuracy=m.accuracy, precision=m.precision,
        recall=m.recall, f1=m.f1, auc=m.auc,
    )


def _score_matrix(rows: Sequence[Feedback], y_true: np.ndarray) -> np.ndarray | None:
    if any(r.score is None for r in rows):
        return None
    classes = [str(c) for c in np.unique(y_true)]
    if len(classes) < 2:
        return None
    if all(isinstance(r.score, float | int) for r in rows):
        return np.asarray([float(r.score) for r in rows]) if len(classes) == 2 else None
    if not all(isinstance(r.score, dict) for r in rows):
        return None
    cols = classes[-1:] if len(classes) == 2 else classes
    try:
        mat = np.asarray([[float(r.score[c]) for c in cols] for r in rows])
    except KeyError:
        return None
    return mat[:, 0] if len(classes) == 2 else mat


def _staleness(created: datetime | None, now: float, windows: list[WindowMetrics],
               metric: str, min_samples: int) -> Staleness:
    judged = [(w.window_start, w.metric(metric)) for w in windows if w.n >= min_samples]
    pts = [(t, v) for t, v in judged if v is not None]
    first = pts[0][1] if pts else None
    last = pts[-1][1] if pts else None
    slope = None
    if len(pts) >= 2:
        t = np.asarray([p[0] for p in pts]) / 86400.0
        v = np.asarray([p[1] for p in pts])
        slope = float(np.polyfit(t - t[0], v, 1)[0])
    return Staleness(
        created=created,
        age_s=None if created is None else max(0.0, now - created.timestamp()),
        metric=metric, first=first, last=last,
        decay=None if first is None or last is None else first - last,
        slope_per_day=slope,
    )


def performance_report(
    session: Session, name: str, version: str | None = None, *, window_s: float = 3600.0,
    periods: int = 24, now: float,
) -> PerformanceReport:
    """Per-window classification metrics of each version of ``name`` (or of one) over
    the last ``periods`` windows, plus the whole span, model age and decay (of the
    policy's floor metric, else accuracy; windows with fewer rows than the floor's
    ``min_samples``, else 1, are not judged).

    Raises:
        ModelNotFound: unknown model or version.
        InvalidRequest: ``window_s`` or ``periods`` out of range.
    """
    if not 0 < window_s <= MAX_WINDOW_S or not 1 <= periods <= 1000:
        raise InvalidRequest("window or periods out of range")
    mvs = session.exec(select(ModelVersion).where(ModelVersion.name == name)).all()
    if version is not None:
        mvs = [m for m in mvs if m.version == version]
    if not mvs:
        raise ModelNotFound(f"no model {name}{':' + version if version else ''}")
    policy = get_policy(session, name)
    metric = policy.performance.metric if policy.performance else "accuracy"
    min_samples = policy.performance.min_samples if policy.performance else 1
    end = now
    start = end - window_s * periods
    out: list[VersionPerformance] = []
    for mv in sorted(mvs, key=lambda m: SemVer.parse(m.version), reverse=True):
        rows = session.exec(
            select(Feedback).where(
                Feedback.model_name == name, Feedback.model_version == mv.version,
                col(Feedback.ts) >= start, col(Feedback.ts) < end,
            ).order_by(col(Feedback.ts))
        ).all()
        buckets: dict[int, list[Feedback]] = {}
        for r in rows:
            buckets.setdefault(min(periods - 1, int((r.ts - start) // window_s)), []).append(r)
        windows = [
            window_metrics(buckets[k], start + k * window_s, start + (k + 1) * window_s)
            for k in sorted(buckets)
        ]
        out.append(
            VersionPerformance(
                version=mv.version, overall=window_metrics(rows, start, end), windows=windows,
                staleness=_staleness(mv.created, now, windows, metric, min_samples),
            )
        )
    return PerformanceReport(name=name, window_s=window_s, periods=periods, versions=out)


# --------------------------------------------------------------------------- operations


class OpsStats(BaseModel):
    """Operational figures of a device, a model or the fleet over a window."""

    key: str = Field(description="Device id, model name:version, or 'fleet'.")
    windows: int = Field(description="Telemetry windows counted.")
    requests: int
    errors: int
    error_rate: float | None = Field(description="errors / requests.")
    throughput_rps: float | None = Field(description="Requests per second of reported time.")
    p50_ms: float | None
    p95_ms: float | None
    latency_source: Literal["sketch", "telemetry", "none"] = Field(
        description="sketch: merged latency histograms; telemetry: request-weighted mean of "
        "per-window quantiles (an approximation)."
    )
    cpu_percent: float | None = Field(description="Mean CPU over the windows.")
    rss_bytes: int | None = Field(description="Largest RSS reported.")
    model: str | None = None
    last_window_end: float | None = None


class OperationsReport(BaseModel):
    cohort: str
    window_start: float
    window_end: float
    fleet: OpsStats
    models: list[OpsStats]
    devices: list[OpsStats]


@dataclass
class _OpsAcc:
    windows: int = 0
    requests: int = 0
    errors: int = 0
    seconds: float = 0.0
    p50_w: float = 0.0
    p95_w: float = 0.0
    lat_w: float = 0.0
    cpu_sum: float = 0.0
    cpu_n: int = 0
    rss: int | None = None
    model: str | None = None
    last_end: float | None = None
    latency: np.ndarray | None = None

    def add(self, t: Telemetry) -> None:
        self.windows += 1
        self.requests += t.inference_count
        self.errors += t.error_count
        self.seconds += max(0.0, t.window_end - t.window_start)
        if t.p50_ms is not None and t.p95_ms is not None and t.inference_count > 0:
            self.p50_w += t.p50_ms * t.inference_count
            self.p95_w += t.p95_ms * t.inference_count
            self.lat_w += t.inference_count
        cpu = t.payload.get("cpu_percent") if isinstance(t.payload, dict) else None
        if isinstance(cpu, int | float) and math.isfinite(cpu):
            self.cpu_sum += float(cpu)
            self.cpu_n += 1
        if t.rss_bytes is not None:
            self.rss = t.rss_bytes if self.rss is None else max(self.rss, t.rss_bytes)
        if self.last_end is None or t.window_end >= self.last_end:
            self.last_end = t.window_end
            self.model = t.model

    def add_latency(self, counts: Sequence[int]) -> None:
        a = np.asarray(counts, dtype=np.int64)
        self.latency = a if self.latency is None else self.latency + a

    def stats(self, key: str, *, with_model: bool = True) -> OpsStats:
        p50 = p95 = None
        source: Literal["sketch", "telemetry", "none"] = "none"
        if self.latency is not None and self.latency.sum() > 0:
            p50 = drift.histogram_quantile(LATENCY_EDGES_MS, self.latency, 0.5)
            p95 = drift.histogram_quantile(LATENCY_EDGES_MS, self.latency, 0.95)
            source = "sketch"
        elif self.lat_w > 0:
            p50, p95, source = self.p50_w / self.lat_w, self.p95_w / self.lat_w, "telemetry"
        return OpsStats(
            key=key, windows=self.windows, requests=self.requests, errors=self.errors,
            error_rate=self.errors / self.requests if self.requests else None,
            throughput_rps=self.requests / self.seconds if self.seconds > 0 else None,
            p50_ms=p50, p95_ms=p95, latency_source=source,
            cpu_percent=self.cpu_sum / self.cpu_n if self.cpu_n else None,
            rss_bytes=self.rss, model=self.model if with_model else None,
            last_window_end=self.last_end,
        )


def operations_report(
    session: Session, *, now: float, window_s: float = 300.0, select_expr: str | None = None,
    stored: Sequence[StoredSketch] | None = None,
) -> OperationsReport:
    """Latency, throughput, errors, CPU and RSS per device, per model and for the whole
    cohort, from telemetry windows ending in ``(now - window_s, now]``.

    Fleet and per-model throughput add the devices' rates; latency quantiles come from
    the merged latency histograms of the drift sketches when there are any.

    Raises:
        InvalidRequest: a bad selector or window.
    """
    if not 0 < window_s <= MAX_WINDOW_S:
        raise InvalidRequest("window out of range")
    sel = _selector(select_expr)
    start = now - window_s
    tele = session.exec(
        select(Telemetry).where(col(Telemetry.window_end) > start, col(Telemetry.window_end) <= now)
    ).all()
    if stored is None:
        stored = load_sketches(session, start, now)
    members = _cohort_devices(session, [t.device_id for t in tele] + [s.device_id for s in stored], sel)
    per_dev: dict[str, _OpsAcc] = {}
    per_model: dict[str, dict[str, _OpsAcc]] = {}
    fleet = _OpsAcc()
    for t in tele:
        if t.device_id not in members:
            continue
        per_dev.setdefault(t.device_id, _OpsAcc()).add(t)
        fleet.add(t)
        if t.model:
            per_model.setdefault(t.model, {}).setdefault(t.device_id, _OpsAcc()).add(t)
    model_lat: dict[str, _OpsAcc] = {}
    for s in stored:
        if s.device_id in members and s.sketch is not None and s.sketch.latency_ms is not None:
            per_dev.setdefault(s.device_id, _OpsAcc()).add_latency(s.sketch.latency_ms)
            fleet.add_latency(s.sketch.latency_ms)
            model_lat.setdefault(s.model, _OpsAcc()).add_latency(s.sketch.latency_ms)
    devices = [per_dev[d].stats(d) for d in sorted(per_dev)]
    models = []
    for m in sorted(set(per_model) | set(model_lat)):
        acc = _OpsAcc()
        rate = 0.0
        has_rate = False
        for dev in per_model.get(m, {}).values():
            acc.windows += dev.windows
            acc.requests += dev.requests
            acc.errors += dev.errors
            acc.p50_w += dev.p50_w
            acc.p95_w += dev.p95_w
            acc.lat_w += dev.lat_w
            acc.cpu_sum += dev.cpu_sum
            acc.cpu_n += dev.cpu_n
            if dev.rss is not None:
                acc.rss = dev.rss if acc.rss is None else max(acc.rss, dev.rss)
            if dev.last_end is not None and (acc.last_end is None or dev.last_end > acc.last_end):
                acc.last_end = dev.last_end
            if dev.seconds > 0:
                rate += dev.requests / dev.seconds
                has_rate = True
        if m in model_lat:
            acc.latency = model_lat[m].latency
        st = acc.stats(m, with_model=False)
        models.append(st.model_copy(update={"throughput_rps": rate if has_rate else None}))
    fleet_rate = [d.throughput_rps for d in devices if d.throughput_rps is not None]
    fs = fleet.stats("fleet", with_model=False).model_copy(
        update={"throughput_rps": sum(fleet_rate) if fleet_rate else None}
    )
    return OperationsReport(
        cohort=str(sel), window_start=start, window_end=now, fleet=fs, models=models, devices=devices,
    )


# --------------------------------------------------------------------------- feedback endpoint


def receive_feedback(
    db: Database, rejects: FeedbackRejects, body: bytes, settings: MonitoringSettings, now: float
) -> FeedbackResult:
    """Parse, validate and store one feedback body; a rejection is counted, then raised.

    Raises:
        PayloadTooLarge: the body is over ``max_feedback_bytes``.
        InvalidFeedback: malformed, too many items, or an unknown model; nothing stored.
    """
    nowdt = datetime.fromtimestamp(now, UTC)
    try:
        batch = parse_feedback(body, max_bytes=settings.max_feedback_bytes,
                               max_items=settings.max_feedback_items)
        with db.session() as s:
            return ingest_feedback(s, batch, now)
    except InvalidFeedback as e:
        rejects.record(db, e, nowdt)
        raise
