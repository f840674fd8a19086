"""REST routes of monitoring (drift, performance, operations, feedback, alerts) and
``GET /metrics``. Thin: each route translates HTTP to one call of
:mod:`hub.monitoring`, :mod:`hub.alerts` or :mod:`hub.metrics_export`.

The router's lifespan (merged into the app's by ``include_router``, so it runs once
the hub has started) starts the :class:`hub.alerts.MonitorLoop` and stops it on
shutdown. Settings come from ``app.state.monitoring_settings`` when set (tests),
else from the environment (:class:`hub.monitoring.MonitoringSettings`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, Path, Query, Request, Response
from sqlmodel import Session, SQLModel, col, select
from starlette.concurrency import run_in_threadpool

from hub import alerts, monitoring
from hub.app import Hub
from hub.errors import NotFound
from hub.metrics_export import CONTENT_TYPE, ProcessCounters, render_metrics
from hub.models_monitoring import (
    AlertPublic,
    CapturedSample,
    CapturedSamplePublic,
    RetrainEpisodePublic,
)
from hub.monitoring import (
    DriftResult,
    FeedbackRejects,
    FeedbackResult,
    MonitoringPolicy,
    MonitoringSettings,
    OperationsReport,
    PayloadTooLarge,
    PerformanceReport,
    ReferenceCache,
)

__all__ = ["router", "MonitoringState", "EvaluationSummary"]


@dataclass
class MonitoringState:
    settings: MonitoringSettings
    references: ReferenceCache
    loop: alerts.MonitorLoop
    rejects: FeedbackRejects


class EvaluationSummary(SQLModel):
    opened: list[AlertPublic]
    escalated: list[AlertPublic]
    resolved: list[AlertPublic]
    retrain_started: list[RetrainEpisodePublic]
    retrain_ended: int
    errors: list[str]


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    hub: Hub = app.state.hub
    settings = getattr(app.state, "monitoring_settings", None) or MonitoringSettings()
    refs = ReferenceCache(hub.repository)
    loop = alerts.MonitorLoop(hub.db, refs, settings)
    app.state.monitoring = MonitoringState(settings, refs, loop, FeedbackRejects())
    loop.start()
    try:
        yield
    finally:
        await asyncio.to_thread(loop.stop)


router = APIRouter(lifespan=_lifespan)


def _hub(request: Request) -> Hub:
    hub: Hub = request.app.state.hub
    return hub


def _state(request: Request) -> MonitoringState:
    st: MonitoringState = request.app.state.monitoring
    return st


HubDep = Annotated[Hub, Depends(_hub)]
StateDep = Annotated[MonitoringState, Depends(_state)]


def _session(hub: HubDep) -> Iterator[Session]:
    with hub.db.session() as s:
        yield s


SessionDep = Annotated[Session, Depends(_session)]
SelectQ = Annotated[str | None, Query(max_length=512, description="Cohort selector, e.g. profile=rpi4,tag=canary.")]
# Row ids are signed 64-bit columns: a larger id is a 422 here, not an overflow in the driver.
RowId = Annotated[int, Path(ge=1, le=2**63 - 1, description="Row id.")]


@router.get("/api/v1/drift/{name}", response_model=DriftResult, tags=["monitoring"],
            summary="Drift of the latest version of a model")
@router.get("/api/v1/drift/{name}/{version}", response_model=DriftResult, tags=["monitoring"],
            summary="Drift of one model version, per feature, against its reference")
def get_drift(
    name: str, session: SessionDep, st: StateDep, version: str | None = None,
    select: SelectQ = None, window: Annotated[str, Query(max_length=16)] = "1h",
    control: SelectQ = None,
) -> DriftResult:
    return monitoring.drift_query(
        session, st.references, name, version, select_expr=select,
        window_s=monitoring.parse_duration(window), now=time.time(), control=control,
    )


@router.get("/api/v1/performance/{name}", response_model=PerformanceReport, tags=["monitoring"])
def get_performance(
    name: str, session: SessionDep, version: str | None = None,
    window: Annotated[str, Query(max_length=16)] = "1h",
    periods: Annotated[int, Query(ge=1, le=1000)] = 24,
) -> PerformanceReport:
    return monitoring.performance_report(
        session, name, version, window_s=monitoring.parse_duration(window), periods=periods,
        now=time.time(),
    )


@router.post("/api/v1/feedback", response_model=FeedbackResult, tags=["monitoring"],
             summary="Labelled predictions: {items: [{model, label, prediction, request_id|ts, ...}]}")
async def post_feedback(request: Request, hub: HubDep, st: StateDep) -> FeedbackResult:
    limit = st.settings.max_feedback_bytes
    body = bytearray()
    declared = request.headers.get("content-length")
    too_big = declared is not None and declared.isdigit() and int(declared) > limit
    if not too_big:
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                too_big = True
                break
    if too_big:
        err = PayloadTooLarge(f"feedback body exceeds {limit} bytes", "oversized")
        await run_in_threadpool(st.rejects.record, hub.db, err, datetime.now(UTC))
        raise err
    return await run_in_threadpool(
        monitoring.receive_feedback, hub.db, st.rejects, bytes(body), st.settings, time.time()
    )


@router.get("/api/v1/captures", response_model=list[CapturedSamplePublic], tags=["monitoring"],
            summary="Samples devices captured and uploaded (opt-in on the device), newest first")
def list_captures(
    session: SessionDep,
    model: Annotated[str | None, Query(max_length=129, description="NAME or NAME:VERSION.")] = None,
    device: Annotated[str | None, Query(max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 100,
) -> list[CapturedSample]:
    q = select(CapturedSample)
    if model:
        name, sep, version = model.partition(":")
        q = q.where(CapturedSample.model_name == name)
        if sep:
            q = q.where(CapturedSample.model_version == version)
    if device:
        q = q.where(CapturedSample.device_id == device)
    return list(session.exec(q.order_by(col(CapturedSample.id).desc()).limit(limit)).all())


@router.get("/api/v1/captures/{capture_id}/npz", tags=["monitoring"],
            summary="One captured sample as .npz: in/<input name> and out/<output name> arrays",
            response_class=Response, responses={200: {"content": {"application/octet-stream": {}}}})
def get_capture(capture_id: RowId, hub: HubDep, session: SessionDep) -> Response:
    row = session.get(CapturedSample, capture_id)
    if row is None:
        raise NotFound(f"no captured sample {capture_id}")
    try:
        data = hub.captures.npz(row)
    except FileNotFoundError as e:
        raise NotFound(f"captured sample {capture_id} is no longer on disk") from e
    return Response(
        data, media_type="application/octet-stream",
        headers={"Content-Disposition": f'attachment; filename="{row.device_id}-{row.sample_id}.npz"'},
    )


@router.get("/api/v1/operations", response_model=OperationsReport, tags=["monitoring"])
def get_operations(
    session: SessionDep, select: SelectQ = None, window: Annotated[str, Query(max_length=16)] = "5m",
) -> OperationsReport:
    return monitoring.operations_report(
        session, now=time.time(), window_s=monitoring.parse_duration(window), select_expr=select
    )


@router.get("/api/v1/alerts", response_model=list[AlertPublic], tags=["monitoring"])
def get_alerts(
    session: SessionDep, state: str | None = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 500,
) -> list[AlertPublic]:
    return alerts.list_alerts(session, state, limit)


@router.get("/api/v1/retrain", response_model=list[RetrainEpisodePublic], tags=["monitoring"],
            summary="Retraining episodes (each fired its trigger once, when it started)")
def get_retrain(
    session: SessionDep, state: str | None = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 500,
) -> list[RetrainEpisodePublic]:
    return alerts.list_episodes(session, state, limit)


@router.get("/api/v1/monitoring/policies/{name}", response_model=MonitoringPolicy, tags=["monitoring"])
def get_policy(name: str, session: SessionDep) -> MonitoringPolicy:
    return monitoring.get_policy(session, name)


@router.put("/api/v1/monitoring/policies/{name}", response_model=MonitoringPolicy, tags=["monitoring"])
def put_policy(name: str, body: MonitoringPolicy, session: SessionDep) -> MonitoringPolicy:
    return monitoring.set_policy(session, name, body)


@router.post("/api/v1/monitoring/evaluate", response_model=EvaluationSummary, tags=["monitoring"],
             summary="Evaluate the alert rules now (the loop also does it every interval_s)")
def post_evaluate(st: StateDep) -> EvaluationSummary:
    ev = st.loop.run_once()

    def pick(event: str) -> list[AlertPublic]:
        return [c.alert for c in ev.changes if c.event == event]

    return EvaluationSummary(
        opened=pick("opened"), escalated=pick("escalated"), resolved=pick("resolved"),
        retrain_started=ev.retrain_started, retrain_ended=ev.retrain_ended, errors=ev.errors,
    )


@router.get("/metrics", tags=["monitoring"], summary="Prometheus text exposition",
            response_class=Response)
def get_metrics(hub: HubDep, st: StateDep, session: SessionDep) -> Response:
    counters = ProcessCounters(
        mqtt_received=dict(hub.mqtt.received), mqtt_dropped=hub.mqtt.dropped,
        feedback_rejected=dict(st.rejects.counts), evaluations=st.loop.evaluations,
        last_evaluation=st.loop.last_run,
    )
    text = render_metrics(session, counters, now=time.time(), ops_window_s=st.settings.ops_window_s)
    return Response(text, media_type=CONTENT_TYPE)
