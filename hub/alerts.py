"""Alerts and retraining triggers: rules, persistence, delivery and the background loop.

Rules (per model version, per cohort of its :class:`~hub.monitoring.MonitoringPolicy`,
over the latest ``window_s``):

==================  ==========================================  =====================
subject             opens when                                  resolves when
==================  ==========================================  =====================
``<feature>``,      drift status >= ``alert_on`` (warn ->        status ``ok`` on at
``prediction``      severity warning, alert -> critical)        least ``min_rows`` rows
``performance:M``   metric M of the window < floor (critical)   M >= floor
``staleness``       deployed and older than ``max_age_days``    not deployed or newer
==================  ==========================================  =====================

A window without enough data changes nothing: silence is not recovery.

Alerts are deduplicated by key ``model|subject|cohort``: at most one *open* alert per
key, enforced by a unique ``open_key`` column. An open alert is updated in place
(value, severity: escalation from warning to critical notifies again) and resolved
with a timestamp; a later breach opens a new alert.

Retraining triggers are episodes with the same open/closed mechanics: a ``drift``
episode starts when some feature is at ``alert`` in each of the last
``retrain_drift_windows`` consecutive windows, a ``performance`` episode when the
floor is breached; the trigger fires once, when the episode starts, and the episode
ends when the condition no longer holds.

Delivery never blocks evaluation or ingest: notifications go to an outbox table
(``monitoring_delivery``) in the same transaction as the alert change, and
:func:`deliver_due` POSTs them (or runs the retraining command) later, retrying with
exponential backoff until ``webhook_max_attempts``.
"""

from __future__ import annotations

import json
import logging
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Final, Literal

import httpx
from pydantic import BaseModel
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import Session, col, select

from hub.db import Database
from hub.errors import HubError, InvalidRequest
from hub.models import Device, ModelVersion
from hub.models_monitoring import (
    Alert,
    AlertPublic,
    Feedback,
    RetrainEpisode,
    RetrainEpisodePublic,
    WebhookDelivery,
)
from hub.monitoring import (
    MonitoringPolicy,
    MonitoringSettings,
    NoReference,
    ReferenceCache,
    StoredSketch,
    drift_query,
    get_policy,
    load_sketches,
    sketch_models,
    window_metrics,
)

__all__ = [
    "AlertChange",
    "Evaluation",
    "alert_key",
    "open_alert",
    "resolve_alert",
    "list_alerts",
    "list_episodes",
    "evaluate",
    "deliver_due",
    "DeliveryReport",
    "MonitorLoop",
]

log = logging.getLogger(__name__)

_SEVERITY: Final = {"warn": "warning", "alert": "critical"}
_SEVERITY_RANK: Final = {"warning": 1, "critical": 2}
_MAX_BACKOFF_S: Final = 3600.0
_DELIVERY_BATCH: Final = 100
MAX_SKETCH_AGE_S: Final = 7 * 86400.0


def alert_key(model: str, subject: str, cohort: str) -> str:
    return f"{model}|{subject}|{cohort}"


# --------------------------------------------------------------------------- persistence


@dataclass(frozen=True)
class AlertChange:
    event: Literal["opened", "escalated", "resolved"]
    alert: AlertPublic


def _public(a: Alert) -> AlertPublic:
    return AlertPublic.model_validate(a, from_attributes=True)


def _find_open(session: Session, key: str) -> Alert | None:
    return session.exec(select(Alert).where(Alert.open_key == key)).first()


def open_alert(
    session: Session, *, kind: str, model: str, subject: str, cohort: str, severity: str,
    value: float | None, threshold: float | None, message: str, details: dict[str, Any],
    now: datetime,
) -> AlertChange | None:
    """Open the alert of (model, subject, cohort), or update the open one.

    Returns the change to notify: ``opened``, ``escalated`` (severity went up), or
    ``None`` (refreshed in place).

    Raises:
        sqlalchemy.exc.IntegrityError: another transaction opened the same key first.
    """
    key = alert_key(model, subject, cohort)
    a = _find_open(session, key)
    if a is None:
        a = Alert(
            key=key, open_key=key, kind=kind, model=model, subject=subject, cohort=cohort,
            severity=severity, state="open", value=value, threshold=threshold,
            message=message[:2000], details=details, opened=now, updated=now,
        )
        # A concurrent evaluator opening the same key fails here on the unique
        # open_key; its transaction rolls back and the next pass refreshes instead.
        session.add(a)
        session.flush()
        return AlertChange("opened", _public(a))
    escalated = _SEVERITY_RANK.get(severity, 0) > _SEVERITY_RANK.get(a.severity, 0)
    a.severity = severity if escalated else a.severity
    a.value, a.threshold, a.message, a.details, a.updated = value, threshold, message[:2000], details, now
    session.add(a)
    session.flush()
    return AlertChange("escalated", _public(a)) if escalated else None


def resolve_alert(session: Session, key: str, now: datetime, reason: str) -> AlertChange | None:
    """Resolve the open alert of ``key``, if any."""
    a = _find_open(session, key)
    if a is None:
        return None
    a.state, a.open_key, a.resolved, a.updated = "resolved", None, now, now
    a.details = {**a.details, "resolved_because": reason}
    session.add(a)
    session.flush()
    return AlertChange("resolved", _public(a))


def list_alerts(session: Session, state: str | None = None, limit: int = 500) -> list[AlertPublic]:
    """Alerts, newest first; ``state`` is ``open`` or ``resolved`` (``None``: both).

    Raises:
        InvalidRequest: another state.
    """
    q = select(Alert)
    if state is not None:
        if state not in ("open", "resolved"):
            raise InvalidRequest("state must be open or resolved")
        q = q.where(Alert.state == state)
    q = q.order_by(col(Alert.opened).desc(), col(Alert.id).desc()).limit(limit)
    return [_public(a) for a in session.exec(q).all()]


def list_episodes(session: Session, state: str | None = None, limit: int = 500) -> list[RetrainEpisodePublic]:
    """Retraining episodes, newest first; ``state`` is ``active`` or ``ended``.

    Raises:
        InvalidRequest: another state.
    """
    q = select(RetrainEpisode)
    if state is not None:
        if state not in ("active", "ended"):
            raise InvalidRequest("state must be active or ended")
        q = q.where(RetrainEpisode.state == state)
    q = q.order_by(col(RetrainEpisode.started).desc(), col(RetrainEpisode.id).desc()).limit(limit)
    return [RetrainEpisodePublic.model_validate(e, from_attributes=True) for e in session.exec(q).all()]


def _start_episode(
    session: Session, model: str, reason: str, cohort: str, details: dict[str, Any], now: datetime
) -> RetrainEpisode | None:
    key = alert_key(model, f"retrain:{reason}", cohort)
    if session.exec(select(RetrainEpisode).where(RetrainEpisode.open_key == key)).first() is not None:
        return None
    ep = RetrainEpisode(
        key=key, open_key=key, model=model, reason=reason, cohort=cohort, state="active",
        details=details, started=now,
    )
    session.add(ep)
    session.flush()
    return ep


def _end_episode(session: Session, model: str, reason: str, cohort: str, now: datetime) -> bool:
    key = alert_key(model, f"retrain:{reason}", cohort)
    ep = session.exec(select(RetrainEpisode).where(RetrainEpisode.open_key == key)).first()
    if ep is None:
        return False
    ep.state, ep.open_key, ep.ended = "ended", None, now
    session.add(ep)
    return True


def _enqueue(session: Session, event: str, targets: list[str], payload: dict[str, Any]) -> None:
    # Due at once by the wall clock (evaluation time may be a replayed ``now``).
    wall = datetime.now(UTC)
    for t in targets:
        session.add(WebhookDelivery(event=event, target=t, payload=payload, next_attempt=wall, created=wall))


# --------------------------------------------------------------------------- evaluation


@dataclass
class Evaluation:
    """What one evaluation pass changed."""

    changes: list[AlertChange] = field(default_factory=list)
    retrain_started: list[RetrainEpisodePublic] = field(default_factory=list)
    retrain_ended: int = 0
    errors: list[str] = field(default_factory=list)


def _monitored_versions(session: Session, now: float) -> set[tuple[str, str]]:
    """Versions with recent sketches, deployed on a device, or with an open alert."""
    out: set[tuple[str, ...]] = {tuple(m.split(":", 1)) for m in sketch_models(session, now - MAX_SKETCH_AGE_S, now)}
    for m in session.exec(select(Device.model).where(col(Device.model).is_not(None))).all():
        if m and ":" in m:
            out.add(tuple(m.split(":", 1)))  # type: ignore[arg-type]
    for m in session.exec(select(Alert.model).where(Alert.state == "open")).all():
        if ":" in m:
            out.add(tuple(m.split(":", 1)))  # type: ignore[arg-type]
    known = {(n, v) for n, v in session.exec(select(ModelVersion.name, ModelVersion.version)).all()}
    return {(n, v) for n, v in out if (n, v) in known}  # type: ignore[misc]


def _drift_rules(
    session: Session, refs: ReferenceCache, name: str, version: str, policy: MonitoringPolicy,
    stored: list[StoredSketch], now: float, nowdt: datetime, ev: Evaluation,
    settings: MonitoringSettings,
) -> None:
    model = f"{name}:{version}"
    w = policy.window_s
    th = policy.thresholds
    rank = {"ok": 0, "warn": 1, "alert": 2}
    for cohort in policy.cohorts:
        res = drift_query(session, refs, name, version, select_expr=cohort, window_s=w, now=now,
                          thresholds=th, stored=stored)
        for row in res.rows_with_prediction():
            key = alert_key(model, row.feature, res.cohort)
            if rank[row.status] >= rank[policy.alert_on] and row.status != "ok":
                ch = open_alert(
                    session, kind="drift", model=model, subject=row.feature, cohort=res.cohort,
                    severity=_SEVERITY[row.status], value=row.psi,
                    threshold=th.psi_alert if row.status == "alert" else th.psi_warn,
                    message=f"{model} {row.role} {row.feature!r} drifted in cohort {res.cohort}: {row.reason}",
                    details={"window_start": res.window_start, "window_end": res.window_end,
                             **row.model_dump(mode="json")},
                    now=nowdt,
                )
                if ch:
                    ev.changes.append(ch)
            elif row.status == "ok" and row.rows >= th.min_rows:
                ch = resolve_alert(session, key, nowdt, f"psi {row.psi} back under threshold")
                if ch:
                    ev.changes.append(ch)
        n = policy.retrain_drift_windows
        if n <= 0:
            continue
        statuses = [any(r.status == "alert" for r in res.rows_with_prediction())]
        for k in range(1, n):
            if not statuses[-1]:
                break
            older = drift_query(session, refs, name, version, select_expr=cohort, window_s=w,
                                now=now - k * w, thresholds=th, stored=stored)
            statuses.append(any(r.status == "alert" for r in older.rows_with_prediction()))
        if len(statuses) == n and all(statuses):
            drifted = sorted(r.feature for r in res.rows_with_prediction() if r.status == "alert")
            _retrain(session, model, "drift", res.cohort,
                     {"windows": n, "window_s": w, "features": drifted}, nowdt, ev, settings)
        elif res.rows >= th.min_rows and not statuses[0]:
            ev.retrain_ended += _end_episode(session, model, "drift", res.cohort, nowdt)


def _retrain(session: Session, model: str, reason: str, cohort: str, details: dict[str, Any],
             nowdt: datetime, ev: Evaluation, settings: MonitoringSettings) -> None:
    ep = _start_episode(session, model, reason, cohort, details, nowdt)
    if ep is None:
        return
    pub = RetrainEpisodePublic.model_validate(ep, from_attributes=True)
    ev.retrain_started.append(pub)
    payload = {"event": "retrain", "episode": pub.model_dump(mode="json")}
    targets = list(settings.retrain_webhooks) + (["command"] if settings.retrain_command else [])
    _enqueue(session, "retrain", targets, payload)
    log.warning("retraining trigger for %s (%s, cohort %s): %s", model, reason, cohort, details)


def _performance_rules(session: Session, name: str, version: str, policy: MonitoringPolicy,
                       now: float, nowdt: datetime, ev: Evaluation, settings: MonitoringSettings) -> None:
    floor = policy.performance
    if floor is None:
        return
    model = f"{name}:{version}"
    start = now - policy.window_s
    rows = session.exec(
        select(Feedback).where(Feedback.model_name == name, Feedback.model_version == version,
                               col(Feedback.ts) >= start, col(Feedback.ts) < now)
    ).all()
    if len(rows) < floor.min_samples:
        return
    m = window_metrics(rows, start, now)
    value = m.metric(floor.metric)
    if value is None:
        return
    subject = f"performance:{floor.metric}"
    if value < floor.floor:
        ch = open_alert(
            session, kind="performance", model=model, subject=subject, cohort="all",
            severity="critical", value=value, threshold=floor.floor,
            message=f"{model} {floor.metric} {value:.3f} < floor {floor.floor} on {m.n} labelled rows",
            details=m.model_dump(mode="json"), now=nowdt,
        )
        if ch:
            ev.changes.append(ch)
        _retrain(session, model, "performance", "all",
                 {"metric": floor.metric, "value": value, "floor": floor.floor, "n": m.n},
                 nowdt, ev, settings)
    else:
        ch = resolve_alert(session, alert_key(model, subject, "all"), nowdt,
                           f"{floor.metric} {value:.3f} >= {floor.floor}")
        if ch:
            ev.changes.append(ch)
        ev.retrain_ended += _end_episode(session, model, "performance", "all", nowdt)


def _staleness_rules(session: Session, name: str, version: str, policy: MonitoringPolicy,
                     nowdt: datetime, ev: Evaluation) -> None:
    if policy.max_age_days is None:
        return
    model = f"{name}:{version}"
    mv = session.exec(select(ModelVersion).where(ModelVersion.name == name,
                                                 ModelVersion.version == version)).first()
    deployed = session.exec(select(Device.device_id).where(Device.model == model)).first() is not None
    key = alert_key(model, "staleness", "all")
    if mv is not None and deployed:
        age_days = (nowdt - mv.created).total_seconds() / 86400.0
        if age_days > policy.max_age_days:
            ch = open_alert(
                session, kind="staleness", model=model, subject="staleness", cohort="all",
                severity="warning", value=age_days, threshold=policy.max_age_days,
                message=f"{model} is deployed and {age_days:.1f} days old (limit {policy.max_age_days})",
                details={"created": mv.created.isoformat()}, now=nowdt,
            )
            if ch:
                ev.changes.append(ch)
            return
    ch = resolve_alert(session, key, nowdt, "not deployed or within age limit")
    if ch:
        ev.changes.append(ch)


def evaluate(db: Database, refs: ReferenceCache, settings: MonitoringSettings, now: float) -> Evaluation:
    """Run every rule for every monitored model version (one transaction per version,
    so one broken model does not stop the others) and queue the notifications."""
    ev = Evaluation()
    nowdt = datetime.fromtimestamp(now, UTC)
    with db.session() as s:
        versions = sorted(_monitored_versions(s, now))
    for name, version in versions:
        before, before_r = len(ev.changes), len(ev.retrain_started)
        try:
            with db.session() as s:
                policy = get_policy(s, name)
                span = policy.window_s * max(1, policy.retrain_drift_windows)
                stored = load_sketches(s, now - span, now, model=f"{name}:{version}")
                try:
                    _drift_rules(s, refs, name, version, policy, stored, now, nowdt, ev, settings)
                except NoReference:
                    pass  # nothing to compare with: performance and staleness still apply
                _performance_rules(s, name, version, policy, now, nowdt, ev, settings)
                _staleness_rules(s, name, version, policy, nowdt, ev)
                for ch in ev.changes[before:]:
                    payload = {"event": f"alert.{ch.event}", "alert": ch.alert.model_dump(mode="json")}
                    _enqueue(s, f"alert.{ch.event}", list(settings.alert_webhooks), payload)
        except (SQLAlchemyError, ValueError, HubError) as e:
            del ev.changes[before:], ev.retrain_started[before_r:]  # rolled back with the transaction
            log.exception("monitoring evaluation of %s:%s failed", name, version)
            ev.errors.append(f"{name}:{version}: {e}")
    return ev


# --------------------------------------------------------------------------- delivery


class DeliveryReport(BaseModel):
    delivered: int = 0
    retried: int = 0
    failed: int = 0


Sender = Callable[[WebhookDelivery], None]


def _post(settings: MonitoringSettings) -> Sender:
    def send(d: WebhookDelivery) -> None:
        if d.target == "command":
            argv = settings.retrain_command
            if not argv:
                raise RuntimeError("no retrain_command configured")
            try:
                r = subprocess.run(argv, input=json.dumps(d.payload).encode(), capture_output=True,
                                   timeout=settings.command_timeout_s, check=False)
            except (OSError, subprocess.TimeoutExpired) as e:
                raise RuntimeError(f"retrain command failed: {e}") from e
            if r.returncode != 0:
                raise RuntimeError(f"retrain command exited {r.returncode}: {r.stderr[-500:]!r}")
            return
        try:
            resp = httpx.post(d.target, json=d.payload, timeout=settings.webhook_timeout_s,
                              headers={"X-Edgefleet-Event": d.event, "X-Edgefleet-Delivery": str(d.id)})
        except (httpx.HTTPError, httpx.InvalidURL) as e:
            raise RuntimeError(f"POST {d.target}: {e}") from e
        if not 200 <= resp.status_code < 300:
            raise RuntimeError(f"POST {d.target}: HTTP {resp.status_code}")

    return send


def deliver_due(db: Database, settings: MonitoringSettings, now: float,
                send: Sender | None = None) -> DeliveryReport:
    """Send every due outbox entry once; failures are rescheduled with exponential
    backoff (``webhook_backoff_s * 2**(attempt-1)``, at most 1 h) and marked failed
    after ``webhook_max_attempts``. No database transaction is held while sending."""
    send = send or _post(settings)
    nowdt = datetime.fromtimestamp(now, UTC)
    with db.session() as s:
        due = s.exec(
            select(WebhookDelivery)
            .where(WebhookDelivery.state == "pending", col(WebhookDelivery.next_attempt) <= nowdt)
            .order_by(col(WebhookDelivery.id)).limit(_DELIVERY_BATCH)
        ).all()
    rep = DeliveryReport()
    for d in due:
        error: str | None = None
        try:
            send(d)
        except RuntimeError as e:
            error = str(e)[:2000]
        with db.session() as s:
            row = s.get(WebhookDelivery, d.id)
            if row is None or row.state != "pending":
                continue
            row.attempts += 1
            if error is None:
                row.state, row.delivered, row.last_error = "delivered", datetime.now(UTC), None
                rep.delivered += 1
            elif row.attempts >= settings.webhook_max_attempts:
                row.state, row.last_error = "failed", error
                rep.failed += 1
                log.error("giving up on %s delivery %s to %s: %s", row.event, row.id, row.target, error)
            else:
                delay = min(_MAX_BACKOFF_S, settings.webhook_backoff_s * 2 ** (row.attempts - 1))
                row.next_attempt, row.last_error = nowdt + timedelta(seconds=delay), error
                rep.retried += 1
                log.warning("%s delivery %s to %s failed (attempt %d), retrying in %.0fs: %s",
                            row.event, row.id, row.target, row.attempts, delay, error)
            s.add(row)
    return rep


# --------------------------------------------------------------------------- loop


class MonitorLoop:
    """Background thread: evaluate the rules every ``interval_s`` and deliver the outbox
    every second (or at once after an evaluation queued something)."""

    def __init__(self, db: Database, refs: ReferenceCache, settings: MonitoringSettings,
                 clock: Callable[[], float] = time.time) -> None:
        self.db = db
        self.refs = refs
        self.settings = settings
        self.clock = clock
        self.last: Evaluation | None = None
        self.last_run: float | None = None
        self.evaluations = 0
        self.failures = 0
        self.deliveries = DeliveryReport()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="edgefleet-hub-monitor", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def wake(self) -> None:
        self._wake.set()

    def run_once(self) -> Evaluation:
        """Evaluate now (serialised with the loop) and deliver what it queued."""
        with self._lock:
            now = self.clock()
            ev = evaluate(self.db, self.refs, self.settings, now)
            self.last, self.last_run = ev, now
            self.evaluations += 1
        self._wake.set()
        return ev

    def _deliver(self) -> None:
        rep = deliver_due(self.db, self.settings, self.clock())
        self.deliveries = DeliveryReport(
            delivered=self.deliveries.delivered + rep.delivered,
            retried=self.deliveries.retried + rep.retried,
            failed=self.deliveries.failed + rep.failed,
        )

    def _run(self) -> None:
        next_eval = time.monotonic() + self.settings.interval_s
        while not self._stop.is_set():
            try:
                if time.monotonic() >= next_eval:
                    next_eval = time.monotonic() + self.settings.interval_s
                    self.run_once()
                self._deliver()
            except Exception:  # noqa: BLE001
                # Deliberately broad, and logged with its traceback: this thread is the
                # only thing that evaluates alerts, so one failing tick (the database
                # briefly unreachable, or a bug) must not stop monitoring for good.
                self.failures += 1
                log.exception("monitoring loop tick failed; retrying next tick")
            self._wake.wait(min(1.0, max(0.05, next_eval - time.monotonic())))
            self._wake.clear()
