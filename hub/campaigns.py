"""Rollout campaigns: the service (create, status, commands) and the engine that drives them.

A campaign rolls one model version out to the devices a selector matches, in
cumulative waves, canary first. Its life is the state machine of :mod:`hub.rollout`;
this module does the IO around it:

- **Admission.** Matching devices are claimed with ``device.campaign_id`` (a compare-
  and-set ``UPDATE ... WHERE campaign_id IS NULL``), so no device is ever in two
  active campaigns. Each gets the bundle for its profile
  (:func:`hub.deployments.choose_bundle`); a device with none is recorded ``skipped``
  with the reason and never claimed. Devices that start matching later (a new device,
  new tags) join the current wave on the next tick.
- **Starting a device** saves its deployment id (and the deployment rows) first and
  publishes after the commit. A hub killed in between republishes the *same*
  deployment id on resume, which an agent ignores when it already has it, so no
  device is ever updated twice.
- **Results** come from the agents' status reports, which :mod:`hub.fleet` folds into
  the deployment rows (duplicates and out-of-order reports are already dropped there).
  A wave never passes while a device started in it has no result, online or not: a
  device whose deployment reached the broker more than the engine's report timeout
  ago (``report_timeout_s``, default 30 minutes) without a result is ``timed_out``,
  which counts as an install failure (a result arriving later, while the campaign is
  active, is still folded in). The timeout restarts at each report of progress (a new
  lifecycle state, or download progress), not at a repeat of the same state, which an
  agent re-sends on each reconnect.
  A wave none of whose devices could be started (all offline) is *held*, with the
  reason in the campaign's status, until one comes online; it never passes untested.
- **Gates** are measured from telemetry rows and drift sketches (:func:`wave_metrics`)
  and judged by :func:`hub.rollout.evaluate_gates`. Count gates are cumulative (every
  wave so far, less the failures an operator's override accepted) and are watched
  while the campaign runs and completes, so a failure reported after its wave passed
  still stops the campaign; quality gates measure the wave itself.
- **Rollback** deploys each updated device's previous version through
  :func:`hub.deployments.create_deployment` with ``allow_downgrade`` (which signs the
  permission into the TUF metadata), again with the deployment id saved first: one
  deployment per previous version and per 10,000 devices. A device is marked sent only
  once the broker acknowledged it, so the others are retried on the next tick; a
  previous version the hub cannot deploy (not in the registry) makes its devices
  ``revert_failed`` with the reason, and the other groups go on. A device whose
  rollback timed out (``revert_failed``) and that reports later that it installed it
  is ``reverted``, even once the campaign has ended.

One engine runs per hub (:class:`CampaignEngine`, ticked from the app's lifespan).
Operator commands and engine ticks take the same lock, so a command never races a
transition.
"""

from __future__ import annotations

import logging
import math
import statistics
import threading
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timedelta
from typing import Any, Literal

from pydantic import Field as PydanticField
from sqlalchemy import func, update
from sqlmodel import Session, SQLModel, col, select

from agent.bundle import SemVer
from agent.errors import PayloadError
from agent.sketch import DriftSketch
from hub import audit, drift
from hub.db import Database
from hub.deployments import (
    DEPLOY_QOS,
    DEPLOY_RETAIN,
    TERMINAL_OUTCOMES,
    Publisher,
    choose_bundle,
    create_deployment,
    deployment_message,
    parse_model_ref,
)
from hub.errors import (
    BrokerUnavailable,
    CampaignNotFound,
    InvalidRequest,
    ModelNotFound,
)
from hub.models import (
    Bundle,
    Campaign,
    CampaignDevice,
    Deployment,
    DeploymentCreate,
    DeploymentDevice,
    Device,
    DriftSketchRow,
    Telemetry,
    utcnow,
)
from hub.registry import bundles_for
from hub.repository import Repository
from hub.rollout import (
    ACTIVE,
    COMMANDS,
    MAX_SAVES,
    TERMINAL,
    CampaignState,
    DeviceState,
    Event,
    Gate,
    WaveMetrics,
    WaveSpec,
    apply_command,
    capped_event,
    evaluate_gates,
    next_state,
    parse_gate,
    parse_waves,
    plan_waves,
)
from hub.selector import Selector, parse_selector

__all__ = [
    "DEFAULT_REPORT_TIMEOUT_S",
    "CampaignCreate",
    "CommandRequest",
    "WavePublic",
    "CampaignDevicePublic",
    "CampaignPublic",
    "CampaignSummary",
    "CampaignEngine",
    "create_campaign",
    "get_campaign",
    "list_campaigns",
    "run_command",
    "wave_metrics",
]

log = logging.getLogger(__name__)

D = DeviceState
_STARTABLE = frozenset({CampaignState.RUNNING, CampaignState.SOAKING,
                        CampaignState.AWAITING_APPROVAL, CampaignState.COMPLETING})
_IN_FLIGHT = frozenset({D.DEPLOYING, D.REVERTING})
_NOT_IN_WAVE = frozenset({D.SKIPPED, D.CANCELLED})  # recorded, but never part of a wave's size
_BEFORE_WINDOW = timedelta(minutes=10)  # old-version baseline looked at before a device's start
_MIN_PSI_ROWS = 50
_PUBLISH_BATCH = 500  # deploy messages sent before waiting for their acknowledgements
_ROLLBACK_CHUNK = 10_000  # devices per rollback deployment: DeploymentCreate.devices' max_length
DEFAULT_REPORT_TIMEOUT_S = 1800.0
"""How long the engine waits, by default, for the result of a device whose deployment
reached the broker before counting it ``timed_out`` (an install failure)."""


# --------------------------------------------------------------------------- API shapes


class CampaignCreate(SQLModel):
    model: str = PydanticField(max_length=200, description="NAME:VERSION to roll out.")
    select: str = PydanticField(max_length=2000, description="Device selector, e.g. profile=x,tag=y or all.")
    waves: str = PydanticField("100", max_length=1000,
                               description="Cumulative waves: percentages (10,50,100) or counts (1n,...,100).")
    soak_s: float = PydanticField(0.0, ge=0, le=30 * 86400, description="Soak time per wave, seconds.")
    gates: list[str] = PydanticField(
        default_factory=list, max_length=20,
        description="Gates like install_failures<=1, psi<=0.25, error_rate<=0.05 min=500 (min=: the "
                    "least inferences error_rate and p95_regression judge on; default 200).")
    approve_waves: bool = PydanticField(False, description="Wait for an operator's approval between waves.")
    rate_per_min: int | None = PydanticField(None, ge=1, le=100_000, description="Most devices started per minute.")
    on_fail: Literal["pause", "rollback"] = PydanticField("pause", description="What a failed gate does.")
    precision: str | None = PydanticField(None, max_length=32)
    format: str | None = PydanticField(None, max_length=16)
    created_by: str = PydanticField("api", max_length=64)


class CommandRequest(SQLModel):
    actor: str = PydanticField("api", max_length=64, description="Who asks.")
    reason: str | None = PydanticField(None, max_length=2000, description="Why.")


class WavePublic(SQLModel):
    index: int
    target: str = PydanticField(description="Cumulative target as given (10% or 5n).")
    cumulative: int = PydanticField(description="Devices updated by the end of this wave.")
    size: int = PydanticField(description="Devices in this wave (skipped ones excluded).")
    counts: dict[str, int] = PydanticField(description="Devices of this wave by state.")
    status: str = PydanticField(
        description="waiting, running, held (none of its devices online to start), soaking, passed, "
                    "failed, overridden.")
    verdicts: list[dict[str, Any]] = PydanticField(default_factory=list)
    metrics: dict[str, Any] | None = None


class CampaignDevicePublic(SQLModel):
    device_id: str
    wave: int
    state: str
    model: str | None = PydanticField(description="What the device runs now (name:version).")
    from_model: str | None
    online: bool
    deployment_id: str | None
    rollback_deployment_id: str | None
    joined_late: bool
    detail: str | None


class CampaignSummary(SQLModel):
    id: str
    model: str
    selector: str
    state: str
    reason: str | None
    wave_index: int
    waves: int
    counts: dict[str, int]
    created: datetime
    created_by: str
    updated: datetime


class CampaignPublic(SQLModel):
    id: str
    model: str
    selector: str
    state: str
    reason: str | None
    wave_index: int
    soak_s: float
    gates: list[str]
    approve_waves: bool
    rate_per_min: int | None
    on_fail: str
    counts: dict[str, int]
    waves: list[WavePublic]
    devices: list[CampaignDevicePublic]
    created: datetime
    created_by: str
    updated: datetime


# --------------------------------------------------------------------------- admission


def _version_of(ref: str | None, name: str) -> SemVer | None:
    if not ref or ":" not in ref:
        return None
    n, _, v = ref.partition(":")
    if n != name:
        return None
    try:
        return SemVer.parse(v)
    except ValueError:
        return None


def _admission(
    bundles: Sequence[Bundle], dev: Device, name: str, version: str,
    precision: str | None, fmt: str | None,
) -> tuple[Bundle | None, str]:
    """The bundle for ``dev``, or None and why it is skipped. Pure."""
    target = SemVer.parse(version)
    cur = _version_of(dev.model, name)
    if cur is not None and cur == target:
        return None, f"already runs {dev.model}"
    if cur is not None and cur > target:
        return None, f"runs newer {dev.model}; a campaign never downgrades (use rollback)"
    choice = choose_bundle(bundles, dev, precision=precision, fmt=fmt)
    return choice.bundle, choice.reason


def _claim(session: Session, device_id: str, campaign_id: str) -> bool:
    # synchronize_session=False: the default evaluated the criteria against every
    # Device loaded in the session, per claim, which made a 10,000-device campaign
    # take minutes to create; no caller reads campaign_id from a loaded Device after.
    res = session.execute(
        update(Device)
        .where(col(Device.device_id) == device_id, col(Device.campaign_id).is_(None))
        .values(campaign_id=campaign_id)
        .execution_options(synchronize_session=False)
    )
    return bool(res.rowcount)  # type: ignore[attr-defined]


def _admit(
    session: Session, c: Campaign, devices: Sequence[Device], *, late: bool, now: datetime
) -> list[CampaignDevice]:
    """Claim and record ``devices`` (already filtered by the selector)."""
    name, version = parse_model_ref(c.model)
    bundles = bundles_for(session, name, version)
    compatible: list[tuple[Device, Bundle]] = []
    rows: list[CampaignDevice] = []
    for dev in sorted(devices, key=lambda d: d.device_id):
        bundle, why = _admission(bundles, dev, name, version, c.precision, c.format)
        if bundle is None:
            rows.append(CampaignDevice(campaign_id=c.id, device_id=dev.device_id, wave=c.wave_index,
                                       state=D.SKIPPED, from_model=dev.model, detail=why,
                                       joined_late=late, updated=now))
            continue
        if _claim(session, dev.device_id, c.id):
            compatible.append((dev, bundle))
    if late:
        waves = [c.wave_index] * len(compatible)
    else:
        plan = plan_waves([WaveSpec.from_dict(w) for w in c.waves], len(compatible))
        waves = [next(k for k, cum in enumerate(plan) if i < cum) for i in range(len(compatible))]
    for (dev, bundle), wave in zip(compatible, waves, strict=True):
        rows.append(CampaignDevice(
            campaign_id=c.id, device_id=dev.device_id, wave=wave, state=D.PENDING,
            from_model=dev.model, bundle_sha256=bundle.sha256, target_path=bundle.target_path,
            joined_late=late, updated=now,
        ))
    session.add_all(rows)
    return rows


def _candidates(session: Session, selector: Selector, exclude: set[str]) -> list[Device]:
    """Announced, unclaimed devices the selector matches, minus ``exclude``."""
    q = select(Device).where(col(Device.campaign_id).is_(None), col(Device.profile).is_not(None))
    if selector.device_id is not None:
        q = q.where(Device.device_id == selector.device_id)
    if selector.profile is not None:
        q = q.where(Device.profile == selector.profile)
    return [d for d in session.exec(q).all() if d.device_id not in exclude and selector.matches(d)]


# --------------------------------------------------------------------------- service


def _transition(
    session: Session, c: Campaign, event: Event, *, actor: str, reason: str | None,
    now: datetime, detail: dict[str, Any] | None = None,
) -> CampaignState:
    """Save ``c``'s move on ``event`` and its audit entry (same transaction)."""
    old = CampaignState(c.state)
    c.saves += 1
    if capped_event(old, event, c.saves) != event:
        event, reason = Event.LOOPED, f"more than {MAX_SAVES} state saves; stopped"
    new = next_state(old, event)
    if event in (Event.NEXT_WAVE, Event.APPROVE):
        c.wave_index += 1
        c.wave_started, c.soak_started = now, None
    elif event == Event.SETTLED:
        c.soak_started = now
    c.state, c.reason, c.updated = new.value, reason, now
    session.add(c)
    if new in TERMINAL:
        _finish(session, c, new, now)
    audit.record(session, actor=actor, action="campaign.transition", campaign_id=c.id, target=c.model,
                 reason=reason, ts=now,
                 detail={"from": old.value, "to": new.value, "event": event.value,
                         "wave": c.wave_index, **(detail or {})})
    log.info("campaign %s: %s --%s--> %s (%s)", c.id, old, event, new, reason or "")
    return new


def _finish(session: Session, c: Campaign, state: CampaignState, now: datetime) -> None:
    """A terminal state: pending devices are cancelled and every claim released."""
    session.execute(
        update(CampaignDevice)
        .where(col(CampaignDevice.campaign_id) == c.id, col(CampaignDevice.state) == D.DEPLOYING,
               col(CampaignDevice.published).is_(False))
        .values(state=D.CANCELLED, updated=now, detail=f"campaign {state.value} before it was sent")
    )
    if state != CampaignState.COMPLETED:
        session.execute(
            update(CampaignDevice)
            .where(col(CampaignDevice.campaign_id) == c.id, col(CampaignDevice.state) == D.PENDING)
            .values(state=D.CANCELLED, updated=now, detail=f"campaign {state.value}")
        )
    session.execute(update(Device).where(col(Device.campaign_id) == c.id).values(campaign_id=None))


def create_campaign(session: Session, request: CampaignCreate, *, now: datetime | None = None) -> str:
    """Record a campaign, claim its devices and plan its waves; returns its id.

    The engine starts the canary on its next tick.

    Raises:
        InvalidRequest: bad model reference.
        InvalidSelector: the selector does not parse.
        InvalidCampaign: bad waves or gates.
        ModelNotFound: no bundle of that model version exists.
    """
    now = now or utcnow()
    name, version = parse_model_ref(request.model)
    selector = parse_selector(request.select)
    waves = parse_waves(request.waves)
    gates = [parse_gate(g) for g in request.gates]
    if not bundles_for(session, name, version):
        raise ModelNotFound(f"no model {name}:{version}")
    c = Campaign(
        id=uuid.uuid4().hex[:16], model=f"{name}:{version}", selector=str(selector),
        state=CampaignState.RUNNING.value, waves=[w.as_dict() for w in waves], soak_s=request.soak_s,
        gates=[g.as_dict() for g in gates], approve_waves=request.approve_waves,
        rate_per_min=request.rate_per_min, on_fail=request.on_fail, precision=request.precision,
        format=request.format, wave_index=0, wave_started=now, created=now,
        created_by=request.created_by, updated=now,
    )
    session.add(c)
    session.flush()
    rows = _admit(session, c, _candidates(session, selector, set()), late=False, now=now)
    counts = Counter(r.state for r in rows)
    audit.record(
        session, actor=request.created_by, action="rollout.create", campaign_id=c.id, target=c.model,
        reason=None, ts=now,
        detail={"select": str(selector), "waves": [str(w) for w in waves],
                "gates": [str(g) for g in gates], "soak_s": request.soak_s, "on_fail": request.on_fail,
                "approve_waves": request.approve_waves, "rate_per_min": request.rate_per_min,
                "devices": counts.get(D.PENDING, 0), "skipped": counts.get(D.SKIPPED, 0)},
    )
    session.commit()
    log.info("campaign %s: %s to %s, %d devices (%d skipped)", c.id, c.model, selector,
             counts.get(D.PENDING, 0), counts.get(D.SKIPPED, 0))
    return c.id


def _get(session: Session, campaign_id: str) -> Campaign:
    c = session.get(Campaign, campaign_id)
    if c is None:
        raise CampaignNotFound(f"no campaign {campaign_id!r}")
    return c


def _held_reason(k: int, members: Iterable[tuple[str, bool]]) -> str | None:
    """Why wave ``k`` is held, or None. Pure.

    ``members`` are (state, online) of the wave's devices. A wave is held when it has
    devices and none of them could be started: every one is pending and offline.
    Passing it would judge its gates on no data and start the next wave untested.
    """
    ms = [(st, online) for st, online in members if st not in _NOT_IN_WAVE]
    if not ms or any(st != D.PENDING or online for st, online in ms):
        return None
    return (f"wave {k + 1} held: none of its {len(ms)} devices is online, so none could be started; "
            f"it waits for one to come online (pause, abort or roll back to stop it)")


def _wave_status(c: Campaign, k: int, held: bool = False) -> str:
    res = c.wave_results[k] if k < len(c.wave_results) else None
    if res is not None:
        if res.get("overridden_by"):
            return "overridden"
        return "passed" if res.get("passed") else "failed"
    if k > c.wave_index:
        return "waiting"
    if k == c.wave_index:
        state = CampaignState(c.state)
        if state == CampaignState.SOAKING:
            return "soaking"
        if state == CampaignState.RUNNING and held:
            return "held"
        if state in ACTIVE:
            return "running" if state != CampaignState.PAUSED else "paused"
        return state.value
    return "passed"


def get_campaign(session: Session, campaign_id: str) -> CampaignPublic:
    """A campaign with its waves and every device's state and model.

    Raises:
        CampaignNotFound: no such campaign.
    """
    c = _get(session, campaign_id)
    rows = session.exec(
        select(CampaignDevice, Device)
        .join(Device, col(Device.device_id) == col(CampaignDevice.device_id))
        .where(CampaignDevice.campaign_id == c.id)
        .order_by(col(CampaignDevice.wave), col(CampaignDevice.device_id))
    ).all()
    specs = [WaveSpec.from_dict(w) for w in c.waves]
    by_wave: dict[int, Counter[str]] = defaultdict(Counter)
    for cd, _ in rows:
        by_wave[cd.wave][cd.state] += 1
    held = _held_reason(c.wave_index, [(cd.state, dev.online) for cd, dev in rows
                                       if cd.wave == c.wave_index]) is not None
    cumulative = 0
    waves: list[WavePublic] = []
    for k, spec in enumerate(specs):
        counts = by_wave.get(k, Counter())
        size = sum(v for s, v in counts.items() if s != D.SKIPPED)
        cumulative += size
        res = c.wave_results[k] if k < len(c.wave_results) else {}
        waves.append(WavePublic(
            index=k, target=str(spec), cumulative=cumulative, size=size,
            counts=dict(counts), status=_wave_status(c, k, held and k == c.wave_index),
            verdicts=list(res.get("verdicts", [])), metrics=res.get("metrics"),
        ))
    devices = [
        CampaignDevicePublic(
            device_id=cd.device_id, wave=cd.wave, state=cd.state, model=dev.model,
            from_model=cd.from_model, online=dev.online, deployment_id=cd.deployment_id,
            rollback_deployment_id=cd.rollback_deployment_id, joined_late=cd.joined_late,
            detail=cd.detail,
        )
        for cd, dev in rows
    ]
    return CampaignPublic(
        id=c.id, model=c.model, selector=c.selector, state=c.state, reason=c.reason,
        wave_index=c.wave_index, soak_s=c.soak_s, gates=[str(Gate.from_dict(g)) for g in c.gates],
        approve_waves=c.approve_waves, rate_per_min=c.rate_per_min, on_fail=c.on_fail,
        counts=dict(Counter(cd.state for cd, _ in rows)), waves=waves, devices=devices,
        created=c.created, created_by=c.created_by, updated=c.updated,
    )


def list_campaigns(session: Session, limit: int = 100) -> list[CampaignSummary]:
    """The newest campaigns first, with device counts by state."""
    cs = session.exec(select(Campaign).order_by(col(Campaign.created).desc()).limit(limit)).all()
    counts: dict[str, Counter[str]] = defaultdict(Counter)
    if cs:
        for cid, state, n in session.exec(
            select(CampaignDevice.campaign_id, CampaignDevice.state, func.count())
            .where(col(CampaignDevice.campaign_id).in_([c.id for c in cs]))
            .group_by(col(CampaignDevice.campaign_id), col(CampaignDevice.state))
        ).all():
            counts[cid][state] = int(n)
    return [
        CampaignSummary(id=c.id, model=c.model, selector=c.selector, state=c.state, reason=c.reason,
                        wave_index=c.wave_index, waves=len(c.waves), counts=dict(counts[c.id]),
                        created=c.created, created_by=c.created_by, updated=c.updated)
        for c in cs
    ]


def run_command(
    session: Session, campaign_id: str, command: str, request: CommandRequest,
    *, now: datetime | None = None,
) -> bool:
    """Apply an operator command; returns False when it was a no-op (already there).

    ``resume`` (or ``approve``) of a wave whose gates failed records the operator's
    override on that wave, which then counts as passed.

    Raises:
        CampaignNotFound: no such campaign.
        CommandRefused: unknown command, or not applicable in the current state.
    """
    now = now or utcnow()
    c = _get(session, campaign_id)
    state = CampaignState(c.state)
    target = apply_command(state, command)
    if target is None:
        audit.record(session, actor=request.actor, action=f"rollout.{command}", campaign_id=c.id,
                     target=c.model, reason=request.reason, ts=now,
                     detail={"noop": True, "state": state.value})
        session.commit()
        return False
    if command in ("resume", "approve") and c.wave_index < len(c.wave_results):
        res = dict(c.wave_results[c.wave_index])
        if not res.get("passed") and not res.get("overridden_by"):
            res["overridden_by"] = request.actor
            res["accepted_failures"] = _failing_devices(session, c.id)
            results = list(c.wave_results)
            results[c.wave_index] = res
            c.wave_results = results
    audit.record(session, actor=request.actor, action=f"rollout.{command}", campaign_id=c.id,
                 target=c.model, reason=request.reason, ts=now, detail={"state": state.value})
    if state in TERMINAL:
        # Rolling back a finished campaign: take back every device the rollback will
        # send something to (updated, timed out, or sent and never answered), unless
        # another campaign owns it by now (those are reported, not touched).
        for cd in session.exec(select(CampaignDevice).where(
            CampaignDevice.campaign_id == c.id,
            col(CampaignDevice.state).in_([D.UPDATED, D.TIMED_OUT, D.DEPLOYING])
        )).all():
            if not _claim(session, cd.device_id, c.id):
                cd.state, cd.updated = D.REVERT_FAILED.value, now
                cd.detail = "owned by another active campaign; not rolled back"
                session.add(cd)
    _transition(session, c, COMMANDS[command], actor=request.actor,
                reason=request.reason or f"{command} by {request.actor}", now=now)
    session.commit()
    return True


# --------------------------------------------------------------------------- metrics


def _median(xs: Iterable[float]) -> float | None:
    v = list(xs)
    return statistics.median(v) if v else None


def _merge_predictions(rows: Iterable[DriftSketchRow]) -> tuple[Any, int]:
    sketches: list[DriftSketch] = []
    for r in rows:
        try:
            sketches.append(DriftSketch.model_validate(r.sketch))
        except ValueError:
            continue
    if not sketches:
        return None, 0
    try:
        m = drift.merge(sketches, skip_invalid=True)
    except PayloadError:
        return None, 0
    if m.predictions is None:
        return None, 0
    return m.predictions.counts, int(m.predictions.counts.sum())


def _reverted_reason(states: Sequence[str]) -> str:
    """A rolled-back campaign's reason, from its devices' states."""
    n, bad = sum(st == D.REVERTED for st in states), sum(st == D.REVERT_FAILED for st in states)
    return f"{n} devices back on their previous version" + (
        f"; {bad} could not be reverted (see their detail)" if bad else "")


def _dep_of(cd: CampaignDevice) -> str:
    """The deployment a campaign device waits on: its rollback while reverting."""
    return _waits_on(cd.state, cd.deployment_id, cd.rollback_deployment_id)


def _waits_on(state: str, deployment_id: str | None, rollback_deployment_id: str | None) -> str:
    """:func:`_dep_of` from the columns."""
    return str(rollback_deployment_id if state == D.REVERTING else deployment_id)


def _failing_devices(session: Session, campaign_id: str) -> dict[str, list[str]]:
    """The devices the count gates count now: ``install`` (failed, rejected, timed out)
    and ``health`` (rolled back by the agent)."""
    rows = session.exec(select(CampaignDevice.device_id, CampaignDevice.state).where(
        CampaignDevice.campaign_id == campaign_id,
        col(CampaignDevice.state).in_([D.FAILED, D.TIMED_OUT, D.HEALTH_FAILED]))).all()
    return {"install": sorted(d for d, st in rows if st != D.HEALTH_FAILED),
            "health": sorted(d for d, st in rows if st == D.HEALTH_FAILED)}


def _accepted(c: Campaign, install: set[str], health: set[str]) -> tuple[int, int]:
    """(install, health): how many of the devices failing now an operator accepted
    when resuming past a failed gate. By device, not by number: an accepted device
    that recovers later (a timed-out one that did install) frees no room for a new
    failure.

    By device and by kind: an operator who accepts a timed-out device accepts an
    install failure (a silent device), not an unhealthy model. When it reports later
    that its agent rolled back, that is a health failure the operator never saw, and it
    counts against the health gates of whatever wave runs then (it leaves the install
    count)."""
    ok_install: set[str] = set()
    ok_health: set[str] = set()
    counted = (0, 0)  # overrides saved before devices were recorded: by number, as then
    for res in c.wave_results:
        if res.get("overridden_by"):
            acc = res.get("accepted_failures")
            if acc is None:
                m = res.get("metrics") or {}
                counted = (int(m.get("install_failures") or 0), int(m.get("health_failures") or 0))
                continue
            ok_install.update(acc.get("install") or ())
            ok_health.update(acc.get("health") or ())
    return (min(len(install), max(len(install & ok_install), counted[0])),
            min(len(health), max(len(health & ok_health), counted[1])))


def wave_metrics(session: Session, c: Campaign, wave: int, now: datetime, *, quality: bool = True) -> WaveMetrics:
    """Measure wave ``wave`` of ``c`` since the wave started.

    - started, failures: cumulative over this wave and every earlier one (device
      states; ``timed_out`` counts as an install failure), with the failures an
      operator's override accepted alongside (:class:`hub.rollout.WaveMetrics`);
    - error rate: telemetry of the wave's updated devices on the target model;
    - p95 regression: per device, median p95 on the target model over median p95 on
      its previous model in the 10 minutes before it was started; the median ratio,
      with the inferences behind it (the smaller of the new- and old-version sums);
    - psi: predictions merged from the drift sketches of the wave's updated devices
      (target model) against a control cohort of campaign devices still waiting on
      their old model, over the same span; in the last wave, where no such cohort is
      left, against the same devices' own sketches from before their update.

    ``quality=False`` measures the device counts only (no data for the quality metrics).
    """
    since = c.wave_started or c.created
    so_far = session.exec(
        select(CampaignDevice).where(CampaignDevice.campaign_id == c.id, col(CampaignDevice.wave) <= wave)
    ).all()
    started = sum(d.started is not None for d in so_far)
    timed_out = sum(d.state == D.TIMED_OUT for d in so_far)
    failing = {d.device_id for d in so_far if d.state in (D.FAILED, D.TIMED_OUT)}
    sick = {d.device_id for d in so_far if d.state == D.HEALTH_FAILED}
    install_failures, health_failures = len(failing), len(sick)
    updated = [d for d in so_far if d.wave == wave and d.state in (D.UPDATED, D.REVERTING, D.REVERTED)]
    upd_ids = [d.device_id for d in updated] if quality else []  # quality=False: the counts only

    error_rate: float | None = None
    inferences = p95_new = p95_old = 0
    p95_ratio: float | None = None
    if upd_ids:
        # Columns rather than ORM objects, and grouped by device once: a 1,000-device
        # wave has tens of thousands of rows here, and a scan of all of them per
        # device took the engine minutes.
        tele = session.exec(
            select(Telemetry.device_id, Telemetry.model, Telemetry.received, Telemetry.p95_ms,
                   Telemetry.inference_count, Telemetry.error_count)
            .where(col(Telemetry.device_id).in_(upd_ids), col(Telemetry.received) >= since - _BEFORE_WINDOW)
        ).all()
        new_rows = [t for t in tele if t.model == c.model and t.received >= since]
        inferences = sum(t.inference_count for t in new_rows)
        if inferences:
            error_rate = sum(t.error_count for t in new_rows) / inferences
        timed: dict[str, list[Any]] = defaultdict(list)
        for t in tele:
            if t.p95_ms is not None and t.inference_count:
                timed[t.device_id].append(t)
        ratios: list[float] = []
        for d in updated:
            mine = timed.get(d.device_id, [])
            new_t = [t for t in mine if t.model == c.model and t.received >= since]
            old_t = [t for t in mine if t.model == d.from_model and d.started and t.received < d.started]
            new = _median(t.p95_ms for t in new_t)
            old = _median(t.p95_ms for t in old_t)
            if new is not None and old:
                ratios.append(new / old)
                p95_new += sum(t.inference_count for t in new_t)
                p95_old += sum(t.inference_count for t in old_t)
        p95_ratio = _median(ratios)

    psi_v: float | None = None
    rows_ctl = rows_can = 0
    if upd_ids:
        canary, rows_can = _merge_predictions(session.exec(
            select(DriftSketchRow).where(col(DriftSketchRow.device_id).in_(upd_ids),
                                         DriftSketchRow.model == c.model,
                                         col(DriftSketchRow.received) >= since)
        ).all())
        control_ids = session.exec(
            select(CampaignDevice.device_id).where(CampaignDevice.campaign_id == c.id,
                                                   CampaignDevice.state == D.PENDING,
                                                   col(CampaignDevice.wave) > wave)
        ).all()
        from_models = {d.from_model for d in updated if d.from_model}
        if control_ids:
            ctl_rows = session.exec(
                select(DriftSketchRow).where(col(DriftSketchRow.device_id).in_(list(control_ids)),
                                             col(DriftSketchRow.model).in_(from_models),
                                             col(DriftSketchRow.received) >= since)
            ).all()
        else:
            first_start = min((d.started for d in updated if d.started), default=since)
            ctl_rows = session.exec(
                select(DriftSketchRow).where(col(DriftSketchRow.device_id).in_(upd_ids),
                                             col(DriftSketchRow.model).in_(from_models),
                                             col(DriftSketchRow.received) >= first_start - _BEFORE_WINDOW,
                                             col(DriftSketchRow.received) < first_start)
            ).all()
        control, rows_ctl = _merge_predictions(ctl_rows)
        if (canary is not None and control is not None and rows_can >= _MIN_PSI_ROWS
                and rows_ctl >= _MIN_PSI_ROWS and len(canary) == len(control)):
            psi_v = drift.psi(control, canary)
    return WaveMetrics(
        started=started, install_failures=install_failures, health_failures=health_failures,
        error_rate=error_rate, inferences=inferences, p95_regression=p95_ratio, psi=psi_v,
        psi_rows=(rows_ctl, rows_can), p95_inferences=min(p95_new, p95_old), timed_out=timed_out,
        accepted=_accepted(c, failing, sick),
    )


# --------------------------------------------------------------------------- engine


class CampaignEngine:
    """Drives every campaign one step per :meth:`tick`.

    A step reads the campaign, folds in device results, admits late joiners, does the
    current state's work and saves at most one transition, in one transaction; the
    MQTT side effects (publishing deployments) follow the commit. Every step is
    idempotent, so a step cut short by a crash is simply redone after restart.

    ``report_timeout_s`` is how long a device whose deployment the broker acknowledged
    may stay without a result before it counts ``timed_out`` (an install failure, as
    an AWS IoT job execution's in-progress timeout does). It is one setting for every
    campaign the engine drives.
    """

    def __init__(
        self,
        db: Database,
        repository: Repository,
        publisher: Publisher,
        *,
        health_window_s: float = 5.0,
        report_timeout_s: float = DEFAULT_REPORT_TIMEOUT_S,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        """Raises:
            ValueError: ``report_timeout_s`` is not a finite number of seconds longer
                than the health window and at most 30 days.
        """
        if not (math.isfinite(report_timeout_s) and health_window_s < report_timeout_s <= 30 * 86400):
            raise ValueError(
                f"report_timeout_s must be longer than the health window ({health_window_s:g} s) "
                f"and at most 30 days, got {report_timeout_s!r}"
            )
        self.db = db
        self.repository = repository
        self.publisher = publisher
        self.health_window_s = health_window_s
        self.report_timeout_s = report_timeout_s
        self.clock = clock
        self.lock = threading.RLock()
        # (campaign, device, deployment) -> (lifecycle state, download progress, time):
        # what a device reported when its report timeout last restarted, at the time
        # saved then in its ``updated``; see _note_progress.
        self._progress: dict[tuple[str, str, str], tuple[str | None, Any, datetime]] = {}

    # ---- public

    def tick(self) -> None:
        """One step of every campaign with work to do. Errors are logged per campaign."""
        with self.db.session() as s:
            ids = list(s.exec(
                select(Campaign.id).where(col(Campaign.state).in_([st.value for st in ACTIVE]))
            ).all())
            ids += [i for i in s.exec(
                select(CampaignDevice.campaign_id).distinct()
                .join(Campaign, col(Campaign.id) == col(CampaignDevice.campaign_id))
                .where(col(Campaign.state).in_([st.value for st in TERMINAL]),
                       col(CampaignDevice.state).in_([D.DEPLOYING, D.REVERTING]))
            ).all() if i not in ids]
            # A rollback that timed out usually ends the campaign (nothing else holds it),
            # so its late result mostly comes after: fold it in then too (see _sync).
            ids += [i for i in s.exec(
                select(CampaignDevice.campaign_id).distinct()
                .join(Campaign, col(Campaign.id) == col(CampaignDevice.campaign_id))
                .join(DeploymentDevice, (col(DeploymentDevice.device_id) == col(CampaignDevice.device_id))
                      & (col(DeploymentDevice.deployment_id) == col(CampaignDevice.rollback_deployment_id)))
                .where(col(Campaign.state).in_([st.value for st in TERMINAL]),
                       CampaignDevice.state == D.REVERT_FAILED, DeploymentDevice.outcome == "installed")
            ).all() if i not in ids]
        with self.lock:  # what _note_progress remembers of campaigns no longer driven
            driven = set(ids)
            self._progress = {k: v for k, v in self._progress.items() if k[0] in driven}
        for cid in ids:
            try:
                self.step(cid)
            except Exception:  # the database, the broker, a defect: this campaign only, this tick
                log.exception("campaign %s: step failed; retrying next tick", cid)

    def step(self, campaign_id: str) -> None:
        """Advance one campaign by one step (see the class docstring)."""
        with self.lock:
            with self.db.session() as s:
                c = _get(s, campaign_id)
                now = self.clock()
                self._sync(s, c, now)
                state = CampaignState(c.state)
                if state in ACTIVE:
                    self._expire(s, c, now)
                if state in ACTIVE and state != CampaignState.ROLLING_BACK:
                    self._admit_late(s, c, now)
                if state in _STARTABLE:
                    self._start_devices(s, c, now)
                if state == CampaignState.ROLLING_BACK:
                    self._plan_reverts(s, c, now)
                if state in ACTIVE:
                    self._advance(s, c, state, now)
            self._publish(campaign_id)

    # ---- work

    def _sync(self, s: Session, c: Campaign, now: datetime) -> None:
        """Fold agents' reports (deployment rows) into the campaign's device states.

        Only rows whose deployment reached an outcome are loaded: a device still
        installing has nothing to fold, and loading every in-flight device on every
        tick was most of the engine's time in a 1,000-device wave. A ``timed_out``
        device's late result is folded in like any other (it did install, or it failed).
        So is a ``revert_failed`` device's rollback that reports ``installed`` after all
        (its rollback timed out, or failed and was retried): it runs its previous version,
        so it is ``reverted``, also once the campaign ended. Its other outcomes change
        nothing: it is ``revert_failed`` already.
        """
        rows = s.exec(
            select(CampaignDevice, DeploymentDevice)
            .join(DeploymentDevice, (col(DeploymentDevice.device_id) == col(CampaignDevice.device_id)) & (
                (col(CampaignDevice.state).in_([D.DEPLOYING, D.TIMED_OUT])
                 & (col(DeploymentDevice.deployment_id) == col(CampaignDevice.deployment_id)))
                | ((col(CampaignDevice.state) == D.REVERTING)
                   & (col(DeploymentDevice.deployment_id) == col(CampaignDevice.rollback_deployment_id)))
                | ((col(CampaignDevice.state) == D.REVERT_FAILED)
                   & (col(DeploymentDevice.deployment_id) == col(CampaignDevice.rollback_deployment_id))
                   & (col(DeploymentDevice.outcome) == "installed"))))
            .where(CampaignDevice.campaign_id == c.id, col(DeploymentDevice.outcome).in_(TERMINAL_OUTCOMES))
        ).all()
        reverted_late: list[str] = []
        for cd, dd in rows:
            new: DeviceState | None = None
            if cd.state in (D.DEPLOYING, D.TIMED_OUT):
                new = {"installed": D.UPDATED, "failed": D.FAILED, "rejected": D.FAILED,
                       "rolled_back": D.HEALTH_FAILED}.get(dd.outcome)
                if dd.outcome == "failed" and dd.state is None:
                    new = None  # the hub could not publish; the engine retries, not a device failure
            elif cd.state == D.REVERTING:
                new = {"installed": D.REVERTED, "failed": D.REVERT_FAILED, "rejected": D.REVERT_FAILED,
                       "rolled_back": D.REVERT_FAILED, "skipped": D.REVERT_FAILED}.get(dd.outcome)
                if dd.outcome == "failed" and dd.state is None:
                    new = None
            elif dd.outcome == "installed":  # revert_failed, and its rollback installed after all
                new = D.REVERTED
            if new is not None:
                was, why = cd.state, cd.detail
                cd.state, cd.finished, cd.updated = new.value, now, now
                if new in (D.FAILED, D.HEALTH_FAILED, D.REVERT_FAILED):
                    cd.detail = dd.error
                elif was == D.TIMED_OUT:
                    cd.detail = f"reported {dd.outcome} after its report timed out"
                elif was == D.REVERT_FAILED:
                    cd.detail = f"reported {dd.outcome} after it was marked revert_failed ({why})"
                    reverted_late.append(cd.device_id)
                s.add(cd)
        if reverted_late:
            self._reverted_late(s, c, sorted(reverted_late), now)

    def _reverted_late(self, s: Session, c: Campaign, devices: list[str], now: datetime) -> None:
        """Record rollbacks reported installed after they were marked revert_failed, and
        bring an ended campaign's reason up to date with them."""
        audit.record(s, actor=audit.ENGINE_ACTOR, action="campaign.reverted_late", campaign_id=c.id,
                     target=c.model, reason="rollback reported installed after its report timed out",
                     ts=now, detail={"devices": devices[:100], "count": len(devices)})
        if c.state == CampaignState.ROLLED_BACK:
            states = s.exec(select(CampaignDevice.state).where(CampaignDevice.campaign_id == c.id)).all()
            c.reason = _reverted_reason(states)
            c.updated = now
            s.add(c)

    def _note_progress(self, s: Session, c: Campaign) -> None:
        """Restart the report timeout of each device in flight whose latest report, if
        newer than the timer's start, shows progress on the deployment it waits on: a
        lifecycle state, or a download progress, other than the one it reported when the
        timer last restarted. The timer then counts from that report.

        A repeat is not progress: the agent re-sends its status on every reconnect
        (the same deployment and state, with a new seq, so a seq tells nothing), and a
        device stuck in one state that keeps reconnecting must still time out.

        The state the timer last restarted on is remembered here, not saved: a
        restarted hub takes the first report it sees from each device as progress, so
        a stuck device gets one more report timeout per hub restart, never more; a
        remembered state whose time is not the device's saved ``updated`` (that step
        was not saved) is ignored the same way.
        """
        # Columns, not objects: after a mass reconnect every device in flight repeats its
        # state and matches here on every tick until it moves on or times out.
        rows = s.exec(
            select(CampaignDevice.device_id, CampaignDevice.state, CampaignDevice.deployment_id,
                   CampaignDevice.rollback_deployment_id, CampaignDevice.updated,
                   DeploymentDevice.state, DeploymentDevice.progress, DeploymentDevice.updated)
            .join(DeploymentDevice, (col(DeploymentDevice.device_id) == col(CampaignDevice.device_id)) & (
                ((col(CampaignDevice.state) == D.DEPLOYING)
                 & (col(DeploymentDevice.deployment_id) == col(CampaignDevice.deployment_id)))
                | ((col(CampaignDevice.state) == D.REVERTING)
                   & (col(DeploymentDevice.deployment_id) == col(CampaignDevice.rollback_deployment_id)))))
            .where(CampaignDevice.campaign_id == c.id, col(CampaignDevice.published).is_(True),
                   col(DeploymentDevice.state).is_not(None),  # the device reported: not just the row's creation
                   col(DeploymentDevice.updated) > col(CampaignDevice.updated))
        ).all()
        restart: dict[str, datetime] = {}
        for device_id, cd_state, dep, rollback_dep, since, state, progress, at in rows:
            key = (c.id, device_id, _waits_on(cd_state, dep, rollback_dep))
            seen = self._progress.get(key)
            if seen is not None and seen[2] == since and seen[:2] == (state, progress):
                continue  # the state (and download progress) the timer last restarted on, again
            self._progress[key] = (state, progress, at)
            restart[device_id] = at
        if restart:  # one executemany by primary key
            s.execute(update(CampaignDevice), [{"campaign_id": c.id, "device_id": d, "updated": at}
                                               for d, at in restart.items()])

    def _expire(self, s: Session, c: Campaign, now: datetime) -> None:
        """Devices sent their deployment more than ``report_timeout_s`` ago without a
        result become ``timed_out``, an install failure for the gates; while rolling
        back, devices sent their rollback as long ago without a result become
        ``revert_failed``, so that one device that never comes back cannot keep a
        rollback (which cannot be aborted) open for good.

        The clock starts when the broker acknowledged the deployment (``updated`` is
        set then, see :meth:`_publish`), so a broker outage does not time devices out,
        and starts again at each report about it that shows progress (a new lifecycle
        state, or a long download's progress; see :meth:`_note_progress`), so what
        times out is a device making no progress, not a slow link, and not one that
        only repeats its state on each reconnect.
        """
        self._note_progress(s, c)
        deadline = now - timedelta(seconds=self.report_timeout_s)
        states = [D.DEPLOYING, D.REVERTING] if c.state == CampaignState.ROLLING_BACK else [D.DEPLOYING]
        late = s.exec(
            select(CampaignDevice).where(CampaignDevice.campaign_id == c.id, col(CampaignDevice.state).in_(states),
                                         col(CampaignDevice.published).is_(True),
                                         col(CampaignDevice.updated) <= deadline)
        ).all()
        if not late:
            return
        why = (f"no result within {self.report_timeout_s:g} s of its deployment reaching the broker "
               f"or of its last report of progress")
        for cd in late:
            expired = D.REVERT_FAILED if cd.state == D.REVERTING else D.TIMED_OUT
            cd.state, cd.finished, cd.updated, cd.detail = expired.value, now, now, why
            s.add(cd)
        ids = sorted(cd.device_id for cd in late)
        audit.record(s, actor=audit.ENGINE_ACTOR, action="campaign.timed_out", campaign_id=c.id,
                     target=c.model, reason=why, ts=now,
                     detail={"devices": ids[:100], "count": len(ids), "report_timeout_s": self.report_timeout_s})
        log.warning("campaign %s: %d devices timed out (%s)", c.id, len(ids), why)

    def _admit_late(self, s: Session, c: Campaign, now: datetime) -> None:
        have = set(s.exec(select(CampaignDevice.device_id).where(CampaignDevice.campaign_id == c.id)).all())
        cands = _candidates(s, parse_selector(c.selector), have)
        if cands:
            rows = _admit(s, c, cands, late=True, now=now)
            joined = [r.device_id for r in rows if r.state == D.PENDING]
            if joined:
                audit.record(s, actor=audit.ENGINE_ACTOR, action="campaign.join", campaign_id=c.id,
                             target=c.model, reason="started matching the selector", ts=now,
                             detail={"devices": joined[:100], "count": len(joined), "wave": c.wave_index})

    def _start_devices(self, s: Session, c: Campaign, now: datetime) -> None:
        budget = None
        if c.rate_per_min:
            recent = s.exec(
                select(func.count()).select_from(CampaignDevice)
                .where(CampaignDevice.campaign_id == c.id,
                       col(CampaignDevice.started) >= now - timedelta(seconds=60))
            ).one()
            budget = max(0, c.rate_per_min - int(recent))
            if budget == 0:
                return
        q = (
            select(CampaignDevice)
            .join(Device, col(Device.device_id) == col(CampaignDevice.device_id))
            .where(CampaignDevice.campaign_id == c.id, CampaignDevice.state == D.PENDING,
                   col(CampaignDevice.wave) <= c.wave_index, col(Device.online).is_(True))
            .order_by(col(CampaignDevice.wave), col(CampaignDevice.device_id))
        )
        if budget is not None:
            q = q.limit(budget)
        todo = s.exec(q).all()
        if not todo:
            return
        dep = Deployment(id=uuid.uuid4().hex, model=c.model, created=now, created_by=f"campaign:{c.id}",
                         precision=c.precision, format=c.format)
        s.add(dep)
        s.flush()
        profiles = dict(s.exec(
            select(Device.device_id, Device.profile).where(col(Device.device_id).in_([cd.device_id for cd in todo]))
        ).all())
        for cd in todo:
            s.add(DeploymentDevice(deployment_id=dep.id, device_id=cd.device_id, bundle_sha256=cd.bundle_sha256,
                                   target_path=cd.target_path, profile=profiles.get(cd.device_id),
                                   outcome="pending", updated=now))
            cd.state, cd.deployment_id, cd.published = D.DEPLOYING.value, dep.id, False
            cd.started, cd.updated = now, now
            s.add(cd)

    def _plan_reverts(self, s: Session, c: Campaign, now: datetime) -> None:
        """Rolling back: give every updated device a rollback deployment id, one per
        previous version and per 10,000 devices (what one deployment takes).

        A device still installing is left to finish first (it is reverted on a later
        tick once it reports), so the rollback deployment is signed as a downgrade
        exactly when the device runs the newer version; one not yet sent anything is
        cancelled. A ``timed_out`` device is sent the rollback too: whatever it runs,
        the rollback replaces the forward deployment the broker keeps for it, which it
        would otherwise install when it comes back (the agent reports a deployment of
        the model it already runs as installed).
        """
        s.execute(
            update(CampaignDevice)
            .where(col(CampaignDevice.campaign_id) == c.id, col(CampaignDevice.state) == D.DEPLOYING,
                   col(CampaignDevice.published).is_(False))
            .values(state=D.CANCELLED, updated=now, detail="campaign rolling back before it was sent")
        )
        todo = s.exec(
            select(CampaignDevice).where(CampaignDevice.campaign_id == c.id,
                                         col(CampaignDevice.state).in_([D.UPDATED, D.TIMED_OUT]))
        ).all()
        groups: dict[str, list[CampaignDevice]] = defaultdict(list)
        for cd in todo:
            if cd.from_model is None:
                cd.state, cd.detail, cd.updated = D.REVERT_FAILED.value, "no previous version to return to", now
                s.add(cd)
            else:
                groups[cd.from_model].append(cd)
        for _model, cds in sorted(groups.items()):
            for k in range(0, len(cds), _ROLLBACK_CHUNK):
                rb = uuid.uuid4().hex
                for cd in cds[k:k + _ROLLBACK_CHUNK]:
                    cd.state, cd.rollback_deployment_id, cd.published, cd.updated = (
                        D.REVERTING.value, rb, False, now)
                    s.add(cd)
        s.execute(
            update(CampaignDevice)
            .where(col(CampaignDevice.campaign_id) == c.id, col(CampaignDevice.state) == D.PENDING)
            .values(state=D.CANCELLED, updated=now, detail="campaign rolling back")
        )

    def _advance(self, s: Session, c: Campaign, state: CampaignState, now: datetime) -> None:
        """Decide the state's event, if any, and save the transition.

        - running: count gates (cumulative) are checked on every tick, so a bad canary
          stops early. The wave settles once no device of it or an earlier wave is in
          flight (started, no result: online or not, until it times out) or about to
          start (pending and online); a wave none of whose devices could be started
          is held instead, with the reason saved on the campaign.
        - soaking: when the soak is over and nothing started is still in flight, every
          gate is judged.
        - completing: count gates are still checked, so a late failure fails the
          campaign per ``on_fail``; it completes once nothing is pending or in flight.
        - rolling_back: done when no device is updated, installing or reverting.
        """
        # Plain columns, not ORM objects: this runs every tick over every device.
        devs = s.exec(
            select(CampaignDevice.wave, CampaignDevice.state, Device.online)
            .join(Device, col(Device.device_id) == col(CampaignDevice.device_id))
            .where(CampaignDevice.campaign_id == c.id)
        ).all()
        gates = [Gate.from_dict(g) for g in c.gates]
        count_gates = [g for g in gates if g.metric in ("install_failures", "health_failures")]
        event: Event | None = None
        reason: str | None = None
        detail: dict[str, Any] = {}
        k = c.wave_index
        last = k >= len(c.waves) - 1
        res = c.wave_results[k] if k < len(c.wave_results) else None
        overridden = bool(res and res.get("overridden_by"))
        in_flight = any(st == D.DEPLOYING for wave, st, _ in devs if wave <= k)
        if state == CampaignState.RUNNING:
            # Only absolute counts while a wave runs: a rate over the few devices
            # that answered first would trip on one early failure.
            early = [g for g in count_gates if not g.rate]
            if early and not overridden:
                event, reason, detail = self._check_counts(s, c, early, gates, now)
            if event is None and not in_flight and not any(
                online and st == D.PENDING for wave, st, online in devs if wave <= k
            ):
                held = _held_reason(k, [(st, online) for wave, st, online in devs if wave == k])
                if held is None:
                    event, reason = Event.SETTLED, f"wave {k + 1} settled"
                elif c.reason != held:
                    c.reason, c.updated = held, now
                    s.add(c)
                    audit.record(s, actor=audit.ENGINE_ACTOR, action="campaign.held", campaign_id=c.id,
                                 target=c.model, reason=held, ts=now, detail={"wave": k})
                    log.warning("campaign %s: %s", c.id, held)
        elif state == CampaignState.SOAKING:
            soak_end = (c.soak_started or now) + timedelta(seconds=0 if overridden else c.soak_s)
            if now >= soak_end and not in_flight:
                if overridden:
                    passed, reason = True, f"wave {k + 1} passed (overridden by {res['overridden_by']})"  # type: ignore[index]
                else:
                    m = wave_metrics(s, c, k, now)
                    verdicts = evaluate_gates(gates, m)
                    self._save_result(c, m, verdicts)
                    failed = [v for v in verdicts if not v.passed]
                    passed = not failed
                    if failed:
                        event, reason, detail = self._trip(c, m, failed, verdicts)
                    else:
                        reason = f"wave {k + 1} passed its gates"
                        blind = [str(v.gate) for v in verdicts if v.value is None]
                        if blind:  # passed, but say which gates could not judge
                            reason += f"; no or not enough data for {', '.join(blind)}"
                        detail = {"verdicts": [v.as_dict() for v in verdicts]}
                if passed:
                    pending = any(st in (D.PENDING, D.DEPLOYING) for _, st, _ in devs)
                    if last:
                        event = Event.LAST_WAVE_PASSED if pending else Event.DRAINED
                    else:
                        event = Event.NEEDS_APPROVAL if c.approve_waves else Event.NEXT_WAVE
        elif state == CampaignState.COMPLETING:
            if count_gates:
                event, reason, detail = self._check_counts(s, c, count_gates, gates, now)
            if event is None and not any(st in (D.PENDING, D.DEPLOYING) for _, st, _ in devs):
                event, reason = Event.DRAINED, "every returning device was updated"
        elif state == CampaignState.ROLLING_BACK:
            if not any(st in (D.UPDATED, D.DEPLOYING, D.REVERTING) for _, st, _ in devs):
                event, reason = Event.REVERTED, _reverted_reason([st for _, st, _ in devs])
        if event is not None:
            _transition(s, c, event, actor=audit.ENGINE_ACTOR, reason=reason, now=now, detail=detail)

    def _check_counts(
        self, s: Session, c: Campaign, count_gates: Sequence[Gate], gates: Sequence[Gate], now: datetime
    ) -> tuple[Event | None, str | None, dict[str, Any]]:
        """The trip of a failed count gate (cumulative failures so far), or no event.

        Runs every tick while a wave runs or the campaign completes: the counts alone
        are measured, and the telemetry and drift queries only when a gate trips."""
        if all(v.passed for v in evaluate_gates(count_gates, wave_metrics(s, c, c.wave_index, now, quality=False))):
            return None, None, {}
        m = wave_metrics(s, c, c.wave_index, now)
        failed = [v for v in evaluate_gates(count_gates, m) if not v.passed]
        return self._trip(c, m, failed, evaluate_gates(gates, m))

    def _save_result(self, c: Campaign, m: WaveMetrics, verdicts: Sequence[Any]) -> None:
        results = list(c.wave_results)
        while len(results) <= c.wave_index:
            results.append({})
        results[c.wave_index] = {"wave": c.wave_index, "passed": all(v.passed for v in verdicts),
                                 "metrics": m.as_dict(), "verdicts": [v.as_dict() for v in verdicts]}
        c.wave_results = results

    def _trip(
        self, c: Campaign, m: WaveMetrics, failed: Sequence[Any], verdicts: Sequence[Any]
    ) -> tuple[Event, str, dict[str, Any]]:
        self._save_result(c, m, verdicts)
        why = "; ".join(
            f"{v.gate} failed: {v.value:.4g} ({v.note})" if v.value is not None else f"{v.gate} failed"
            for v in failed
        )
        event = Event.GATE_FAILED_ROLLBACK if c.on_fail == "rollback" else Event.GATE_FAILED_PAUSE
        return event, f"wave {c.wave_index + 1}: {why}", {"verdicts": [v.as_dict() for v in verdicts]}

    # ---- side effects (after the commit)

    def _publish(self, campaign_id: str) -> None:
        """Publish what the saved state says is due and not yet acknowledged.

        Only devices the broker acknowledged are marked ``published`` (their
        ``updated`` time then starts the report timeout); the others are retried on
        the next tick with the same deployment id. A rollback group whose previous
        version cannot be deployed (:class:`ModelNotFound`, :class:`InvalidRequest`:
        bad data, which no retry mends) turns its devices ``revert_failed`` with the
        reason; the other groups go on.
        """
        with self.db.session() as s:
            todo = s.exec(
                select(CampaignDevice).where(CampaignDevice.campaign_id == campaign_id,
                                             col(CampaignDevice.published).is_(False),
                                             col(CampaignDevice.state).in_([D.DEPLOYING, D.REVERTING]))
            ).all()
            if not todo or not self.publisher.connected:
                return
            c = _get(s, campaign_id)
            s.commit()  # end the read; nothing is held while waiting on the broker
            forward = [cd for cd in todo if cd.state == D.DEPLOYING]
            # Pipelined (one round trip per batch, not per device), and ``published`` is
            # saved after the acknowledgements in one short transaction per batch: a
            # write transaction held across a thousand acknowledgements kept SQLite
            # locked long enough for the ingest worker to time out and drop status.
            for k in range(0, len(forward), _PUBLISH_BATCH):
                part = forward[k:k + _PUBLISH_BATCH]
                results = self.publisher.publish_many(
                    [deployment_message(cd.device_id, str(cd.deployment_id), c.model, str(cd.target_path),
                                        self.health_window_s) for cd in part],
                    qos=DEPLOY_QOS, retain=DEPLOY_RETAIN,
                )
                acked: dict[str, list[str]] = defaultdict(list)
                for cd, err in zip(part, results, strict=True):
                    if err is None:
                        acked[str(cd.deployment_id)].append(cd.device_id)
                for dep_id, ids in acked.items():
                    s.execute(update(CampaignDevice)
                              .where(col(CampaignDevice.campaign_id) == c.id,
                                     col(CampaignDevice.device_id).in_(ids),
                                     col(CampaignDevice.deployment_id) == dep_id,
                                     col(CampaignDevice.state) == D.DEPLOYING)
                              .values(published=True, updated=self.clock()))
                s.commit()
                failed = [(cd.device_id, err) for cd, err in zip(part, results, strict=True) if err is not None]
                if failed:
                    log.warning("campaign %s: publish to %d devices failed (first: %s: %s); will retry",
                                c.id, len(failed), failed[0][0], failed[0][1])
                    break
            groups: dict[tuple[str, str], list[str]] = defaultdict(list)
            for cd in todo:
                if cd.state == D.REVERTING and cd.rollback_deployment_id and cd.from_model:
                    groups[(cd.rollback_deployment_id, cd.from_model)].append(cd.device_id)
            for (rb, model), ids in groups.items():
                try:
                    dep = create_deployment(
                        s, self.repository, self.publisher,
                        DeploymentCreate(model=model, devices=ids, allow_downgrade=True,
                                         created_by=f"campaign:{c.id}"),
                        health_window_s=self.health_window_s, deployment_id=rb,
                    )
                except (ModelNotFound, InvalidRequest) as e:
                    s.rollback()
                    now = self.clock()
                    why = f"cannot roll back to {model}: {e}"
                    s.execute(update(CampaignDevice)
                              .where(col(CampaignDevice.campaign_id) == c.id,
                                     col(CampaignDevice.rollback_deployment_id) == rb,
                                     col(CampaignDevice.state) == D.REVERTING)
                              .values(state=D.REVERT_FAILED, finished=now, updated=now, detail=why))
                    audit.record(s, actor=audit.ENGINE_ACTOR, action="campaign.revert_failed", campaign_id=c.id,
                                 target=model, reason=why, ts=now,
                                 detail={"devices": sorted(ids)[:100], "count": len(ids)})
                    s.commit()
                    log.error("campaign %s: %s (%d devices)", c.id, why, len(ids))
                    continue
                except BrokerUnavailable as e:
                    s.rollback()
                    log.warning("campaign %s: rollback publish stopped (%s); will retry", c.id, e)
                    break
                # A row the broker did not acknowledge reads failed with no lifecycle state.
                unacked = [d.device_id for d in dep.devices if d.outcome == "failed" and d.state is None]
                # Only the devices this publish sent: one already sent (a retry of others in
                # its group) keeps the time its own report timeout started from.
                q = update(CampaignDevice).where(col(CampaignDevice.campaign_id) == c.id,
                                                 col(CampaignDevice.rollback_deployment_id) == rb,
                                                 col(CampaignDevice.state) == D.REVERTING,
                                                 col(CampaignDevice.device_id).in_(ids),
                                                 col(CampaignDevice.published).is_(False))
                if unacked:
                    q = q.where(col(CampaignDevice.device_id).not_in(unacked))
                    log.warning("campaign %s: rollback publish to %d devices failed (first: %s); will retry",
                                c.id, len(unacked), unacked[0])
                s.execute(q.values(published=True, updated=self.clock()))  # starts the report timeout
                s.commit()
