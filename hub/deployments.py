"""Deployments: putting one model version on a list of devices.

For each device the hub picks the bundle built for the device's profile
(:func:`choose_bundle`), records the deployment, then publishes a retained
:class:`~agent.protocol.Deployment` (the device's desired state) on its deploy topic.
The database row is written before anything is published, so a crash in between
leaves a deployment whose devices show ``pending``, never a device acting on a
deployment the hub does not know. Devices report progress through status
messages, which :mod:`hub.fleet` folds into the per-device rows.

Campaigns (waves, gates, rollback; issue #4) build on :func:`choose_bundle` and
:func:`deployment_message` (sent with :meth:`Publisher.publish_many`).
"""

from __future__ import annotations

import logging
import uuid
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from sqlmodel import Session, col, select

from agent import protocol, topics
from agent.bundle import SemVer
from hub.errors import (
    BrokerUnavailable,
    DeploymentNotFound,
    DeviceNotFound,
    DowngradeRefused,
    InvalidRequest,
    ModelNotFound,
)
from hub.models import (
    Bundle,
    Deployment,
    DeploymentCreate,
    DeploymentDevice,
    DeploymentDevicePublic,
    DeploymentPublic,
    Device,
    utcnow,
)
from hub.registry import bundles_for
from hub.repository import Repository

__all__ = [
    "Publisher",
    "Choice",
    "TERMINAL_OUTCOMES",
    "parse_model_ref",
    "choose_bundle",
    "needs_downgrade",
    "create_deployment",
    "get_deployment",
    "list_deployments",
    "deployment_message",
]

log = logging.getLogger(__name__)

TERMINAL_OUTCOMES = frozenset({"installed", "failed", "rolled_back", "rejected", "skipped"})


class Publisher(Protocol):
    """What the deployment service needs from the MQTT transport."""

    @property
    def connected(self) -> bool: ...

    def publish(self, topic: str, payload: bytes, *, qos: int, retain: bool) -> None:
        """Publish and wait for the broker's acknowledgement (QoS 1).

        Raises:
            BrokerUnavailable: not connected, or no acknowledgement in time.
        """

    def publish_many(
        self, messages: Sequence[tuple[str, bytes]], *, qos: int, retain: bool
    ) -> list[BrokerUnavailable | None]:
        """Publish every ``(topic, payload)``, then wait for the acknowledgements:
        pipelined, so a thousand devices cost about one round trip, not a thousand.

        Returns, in order, None for each message the broker acknowledged and the
        error for each it did not; raises nothing.
        """


def parse_model_ref(ref: str) -> tuple[str, str]:
    """Split ``NAME:VERSION``.

    Raises:
        InvalidRequest: not of that form, or VERSION is not a semantic version.
    """
    name, sep, version = ref.partition(":")
    if not sep or not name or not version:
        raise InvalidRequest(f"model must be NAME:VERSION, got {ref!r}")
    try:
        SemVer.parse(version)
    except ValueError as e:
        raise InvalidRequest(str(e)) from e
    return name, version


@dataclass(frozen=True)
class Choice:
    """The bundle picked for one device, or why none was."""

    bundle: Bundle | None
    reason: str = ""


def _precision_matches(have: str, want: str) -> bool:
    # "int8" selects "int8-qdq"; an exact name always matches.
    return have == want or have.startswith(want + "-")


def _version_tuple(text: str) -> tuple[int, ...] | None:
    parts: list[int] = []
    for p in text.split("."):
        digits = "".join(ch for ch in p if ch.isdigit())
        if not digits:
            return None if not parts else tuple(parts)
        parts.append(int(digits))
    return tuple(parts)


def _runtime_ok(bundle: Bundle, runtimes: dict[str, str]) -> bool:
    if not runtimes:  # the device did not say (yet): let its agent decide
        return True
    have = runtimes.get(bundle.runtime)
    if have is None:
        return False
    need = _version_tuple(str(bundle.manifest.get("min_runtime_version", "")))
    got = _version_tuple(have)
    return need is None or got is None or got >= need


def choose_bundle(
    bundles: Sequence[Bundle],
    device: Device,
    *,
    precision: str | None = None,
    fmt: str | None = None,
) -> Choice:
    """Pick the bundle for ``device`` among one model version's bundles. Pure.

    Filters by the device's profile, the requested precision and format, and the
    runtimes the device announced. Among what is left the compiler's selected
    candidate wins, then the most recently uploaded one.
    """
    if device.profile is None:
        return Choice(None, "device has not announced its profile yet")
    cands = [b for b in bundles if b.profile == device.profile]
    if not cands:
        return Choice(None, f"no bundle for profile {device.profile}")
    if precision is not None:
        have = sorted({b.precision for b in cands})
        cands = [b for b in cands if _precision_matches(b.precision, precision)]
        if not cands:
            return Choice(None, f"no {precision} bundle for {device.profile} (have {', '.join(have)})")
    if fmt is not None:
        have = sorted({b.format for b in cands})
        cands = [b for b in cands if b.format == fmt]
        if not cands:
            return Choice(None, f"no {fmt} bundle for {device.profile} (have {', '.join(have)})")
    runnable = [b for b in cands if _runtime_ok(b, device.runtimes)]
    if not runnable:
        need = sorted({f"{b.runtime}>={b.manifest.get('min_runtime_version', '?')}" for b in cands})
        return Choice(
            None,
            f"device lacks a runtime for these bundles (needs {', '.join(need)}; "
            f"has {', '.join(f'{k} {v}' for k, v in sorted(device.runtimes.items())) or 'none'})",
        )
    runnable.sort(key=lambda b: (b.selected, b.created, b.sha256), reverse=True)
    return Choice(runnable[0])


def needs_downgrade(device: Device, name: str, version: str) -> bool:
    """Whether installing ``name:version`` on ``device`` goes back to an older version."""
    if not device.model or ":" not in device.model:
        return False
    cur_name, _, cur_version = device.model.partition(":")
    if cur_name != name:
        return False
    try:
        return SemVer.parse(version) < SemVer.parse(cur_version)
    except ValueError:
        return False


def _unique(ids: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(ids))


DEPLOY_QOS = topics.QOS["deploy"]
DEPLOY_RETAIN = "deploy" in topics.RETAINED


def deployment_message(
    device_id: str, deployment_id: str, model: str, target_path: str, health_window_s: float
) -> tuple[str, bytes]:
    """The topic and payload of one device's desired state (publish with ``DEPLOY_QOS``,
    retained when ``DEPLOY_RETAIN``; :meth:`Publisher.publish_many` takes a list of them)."""
    payload = protocol.Deployment(
        deployment_id=deployment_id,
        model=model,
        target_path=target_path,
        health_window_s=health_window_s,
    )
    return topics.device_topic(device_id, "deploy"), protocol.encode(payload)


def create_deployment(
    session: Session,
    repository: Repository,
    publisher: Publisher,
    request: DeploymentCreate,
    *,
    health_window_s: float = 5.0,
    deployment_id: str | None = None,
) -> DeploymentPublic:
    """Deploy a model version to the listed devices.

    Devices without a compatible bundle are recorded as ``skipped`` with the reason;
    nothing is sent to them. With ``allow_downgrade`` the targets going back a
    version are re-signed with ``allow_downgrade`` before anything is published.

    ``deployment_id`` makes the call idempotent for callers that save the id before
    calling (the campaign engine): when that deployment already exists, those of its
    devices listed in ``request`` that have not answered yet are sent the same desired
    state again (agents ignore a deployment id they already know) and nothing new is
    recorded.

    A device the broker does not acknowledge is recorded ``failed`` with no lifecycle
    state and the error "could not publish: ..." (a first call and a repeat alike),
    so the caller can tell which devices to retry; a repeat that reaches it sets it
    back to ``pending``.

    Raises:
        InvalidRequest: bad model reference or device id.
        ModelNotFound: no bundle of that model version exists.
        DeviceNotFound: some device id has never connected.
        DowngradeRefused: some device runs a newer version of the model and
            ``allow_downgrade`` was not given.
        BrokerUnavailable: the hub is not connected to the broker (nothing is recorded).
    """
    if deployment_id is not None:
        existing = session.get(Deployment, deployment_id)
        if existing is not None:
            return _republish(session, publisher, existing, health_window_s, set(request.devices))
    name, version = parse_model_ref(request.model)
    ref = f"{name}:{version}"
    device_ids = _unique(request.devices)
    bad = [d for d in device_ids if not topics.valid_device_id(d)]
    if bad:
        raise InvalidRequest(f"invalid device ids: {', '.join(map(repr, bad[:10]))}")
    bundles = bundles_for(session, name, version)
    if not bundles:
        raise ModelNotFound(f"no model {ref}")
    devices = {
        d.device_id: d
        for d in session.exec(select(Device).where(col(Device.device_id).in_(device_ids))).all()
    }
    missing = [d for d in device_ids if d not in devices]
    if missing:
        raise DeviceNotFound(f"unknown devices: {', '.join(missing[:20])}")

    choices = {
        d: choose_bundle(bundles, devices[d], precision=request.precision, fmt=request.format)
        for d in device_ids
    }
    downgrading = [
        d for d in device_ids if choices[d].bundle is not None and needs_downgrade(devices[d], name, version)
    ]
    if downgrading and not request.allow_downgrade:
        shown = ", ".join(f"{d} ({devices[d].model})" for d in downgrading[:10])
        raise DowngradeRefused(
            f"{ref} is older than what runs on {shown}; pass allow_downgrade to sign a rollback"
        )
    if not publisher.connected:
        raise BrokerUnavailable("the hub is not connected to the MQTT broker")

    # With allow_downgrade every chosen target is signed as a permitted rollback, not only
    # those the hub knows to be older than what a device runs: a device that installed
    # something newer without reporting it (one a campaign timed out) must still take it.
    signed = [d for d in device_ids if choices[d].bundle is not None] if request.allow_downgrade else []
    for target in sorted({choices[d].bundle.target_path for d in signed}):  # type: ignore[union-attr]
        repository.set_allow_downgrade(target, True)

    dep = Deployment(
        id=deployment_id or uuid.uuid4().hex,
        model=ref,
        created_by=request.created_by,
        allow_downgrade=request.allow_downgrade,
        precision=request.precision,
        format=request.format,
    )
    session.add(dep)
    rows: list[DeploymentDevice] = []
    for d in device_ids:
        b = choices[d].bundle
        rows.append(
            DeploymentDevice(
                deployment_id=dep.id,
                device_id=d,
                bundle_sha256=b.sha256 if b else None,
                target_path=b.target_path if b else None,
                profile=devices[d].profile,
                precision=b.precision if b else None,
                outcome="pending" if b else "skipped",
                error=None if b else choices[d].reason,
            )
        )
    session.add_all(rows)
    session.commit()  # persisted before any side effect

    due = [row for row in rows if row.target_path is not None]
    results = publisher.publish_many(
        [deployment_message(row.device_id, dep.id, ref, str(row.target_path), health_window_s) for row in due],
        qos=DEPLOY_QOS, retain=DEPLOY_RETAIN,
    )
    for row, err in zip(due, results, strict=True):
        if err is not None:
            row.outcome, row.error, row.updated = "failed", f"could not publish: {err}", utcnow()
            session.add(row)
            log.warning("deployment %s: publish to %s failed: %s", dep.id, row.device_id, err)
    session.commit()
    log.info(
        "deployment %s: %s to %d devices (%d skipped)",
        dep.id, ref, len(rows), sum(r.outcome == "skipped" for r in rows),
    )
    return _public(dep, rows)


def _republish(
    session: Session, publisher: Publisher, dep: Deployment, health_window_s: float, only: set[str]
) -> DeploymentPublic:
    if not publisher.connected:
        raise BrokerUnavailable("the hub is not connected to the MQTT broker")
    rows = session.exec(
        select(DeploymentDevice).where(DeploymentDevice.deployment_id == dep.id)
    ).all()
    due = [row for row in rows
           if row.device_id in only and row.target_path is not None
           and row.outcome in ("pending", "failed") and row.state is None]
    results = publisher.publish_many(
        [deployment_message(row.device_id, dep.id, dep.model, str(row.target_path), health_window_s)
         for row in due],
        qos=DEPLOY_QOS, retain=DEPLOY_RETAIN,
    )
    for row, err in zip(due, results, strict=True):
        if err is not None:
            row.outcome, row.error, row.updated = "failed", f"could not publish: {err}", utcnow()
            session.add(row)
            log.warning("deployment %s: publish to %s failed again: %s", dep.id, row.device_id, err)
        elif row.outcome == "failed":
            row.outcome, row.error, row.updated = "pending", None, utcnow()
            session.add(row)
    session.commit()
    return _public(dep, rows)


def _public(dep: Deployment, rows: Sequence[DeploymentDevice]) -> DeploymentPublic:
    devs = [DeploymentDevicePublic.model_validate(r, from_attributes=True) for r in rows]
    return DeploymentPublic(
        id=dep.id,
        model=dep.model,
        created=dep.created,
        created_by=dep.created_by,
        allow_downgrade=dep.allow_downgrade,
        precision=dep.precision,
        format=dep.format,
        devices=devs,
        counts=dict(Counter(r.outcome for r in rows)),
    )


def get_deployment(session: Session, deployment_id: str) -> DeploymentPublic:
    """A deployment with the status of each of its devices.

    Raises:
        DeploymentNotFound: no such deployment.
    """
    dep = session.get(Deployment, deployment_id)
    if dep is None:
        raise DeploymentNotFound(f"no deployment {deployment_id!r}")
    rows = session.exec(
        select(DeploymentDevice)
        .where(DeploymentDevice.deployment_id == deployment_id)
        .order_by(col(DeploymentDevice.device_id))
    ).all()
    return _public(dep, rows)


def list_deployments(session: Session, limit: int = 50) -> list[DeploymentPublic]:
    """The most recent deployments, newest first."""
    deps = session.exec(select(Deployment).order_by(col(Deployment.created).desc()).limit(limit)).all()
    return [get_deployment(session, d.id) for d in deps]
