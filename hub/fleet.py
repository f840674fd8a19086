"""The fleet registry: what the hub knows about each device.

Devices are never registered by hand: a device row appears with the first message
the hub receives from it and is filled in by its retained hello, presence and status
messages. Status reports carry a per-device sequence number; a report whose ``seq``
is not newer than the last one applied is ignored, so duplicates and out-of-order
deliveries (QoS 1 redelivery, retained replays after a hub restart) are harmless.
Agents must therefore keep ``seq`` increasing across their own restarts.

Clock skew: devices stamp windows, labels and samples with their own wall clock,
which may be wrong (no RTC, NTP not yet synced) or stepped. The hub measures each
device's offset from its live hello on every connect (``Device.clock_offset_s``);
while the offset is over :data:`CLOCK_SKEW_TOLERANCE_S`, the ingest moves that
device's timestamps onto the hub's clock (``hub.telemetry.to_hub_clock``), so its
windows land where they belong in fleet statistics. Campaign gates never depend on
device clocks: they use the hub's receive time.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from datetime import datetime

from sqlalchemy import Dialect, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlmodel import Session, col, select

from agent import protocol
from hub.errors import DeviceNotFound
from hub.models import DeploymentDevice, Device, DevicePublic
from hub.selector import parse_selector

__all__ = [
    "ensure_devices",
    "touch_devices",
    "preload",
    "apply_hello",
    "CLOCK_SKEW_TOLERANCE_S",
    "apply_presence",
    "apply_status",
    "list_devices",
    "get_device",
    "dialect_insert",
]

log = logging.getLogger(__name__)

CLOCK_SKEW_TOLERANCE_S = 2.0
"""Offsets up to this are network delay and jitter, and left alone."""


def dialect_insert(dialect: Dialect):  # type: ignore[no-untyped-def]
    """The INSERT construct with ON CONFLICT support for this backend."""
    return pg_insert if dialect.name == "postgresql" else sqlite_insert


def ensure_devices(session: Session, device_ids: Iterable[str], now: datetime) -> None:
    """Create rows for devices not seen before (one statement, no-op for known ones)."""
    ids = sorted(set(device_ids))
    if not ids:
        return
    ins = dialect_insert(session.get_bind().dialect)(Device).values(
        [
            {
                "device_id": d,
                "tags": [],
                "runtimes": {},
                "conditions": [],
                "online": False,
                "first_seen": now,
            }
            for d in ids
        ]
    )
    session.execute(ins.on_conflict_do_nothing(index_elements=["device_id"]))


def touch_devices(session: Session, device_ids: Iterable[str], now: datetime) -> None:
    """Record that these devices were heard from at ``now``."""
    ids = sorted(set(device_ids))
    if ids:
        session.execute(
            update(Device).where(col(Device.device_id).in_(ids)).values(last_seen=now)
        )


def preload(
    session: Session, device_ids: Iterable[str], deployments: Iterable[tuple[str, str]] = ()
) -> list[object]:
    """Load these devices' rows, and the ``(device_id, deployment_id)`` deployment rows,
    into ``session`` with one query each, so that :func:`apply_hello`,
    :func:`apply_presence` and :func:`apply_status` for a batch of messages find them
    there instead of querying once per message (the ingest worker's main cost when a
    thousand devices report at once).

    Returns the loaded rows: the session only holds them weakly, so the caller keeps
    this list for as long as it uses the session.
    """
    loaded: list[object] = []
    ids = sorted(set(device_ids))
    if ids:
        loaded += session.exec(select(Device).where(col(Device.device_id).in_(ids))).all()
    pairs = set(deployments)
    if pairs:
        loaded += session.exec(select(DeploymentDevice).where(
            col(DeploymentDevice.deployment_id).in_(sorted({dep for _, dep in pairs})),
            col(DeploymentDevice.device_id).in_(sorted({dev for dev, _ in pairs})),
        )).all()
    return loaded


def _device(session: Session, device_id: str) -> Device:
    dev = session.get(Device, device_id)
    if dev is None:  # ensure_devices runs first; this is for direct callers
        dev = Device(device_id=device_id)
        session.add(dev)
    return dev


def apply_hello(
    session: Session, device_id: str, hello: protocol.Hello, now: datetime, *, live: bool = False
) -> float | None:
    """A device (re)announced itself: profile, runtimes, tags and current model.

    A *live* hello (published on connect and delivered at once, not a retained copy)
    also measures the device's clock offset: hub receive time minus the device's send
    time. Returns that offset, or None for a retained hello.

    A retained copy sent before the last message the hub took from the device (a
    starting hub gets every device's retained hello again) changes nothing: the
    device's model has moved on since, as its later status reports said.
    """
    dev = _device(session, device_id)
    offset = None
    if live:
        offset = now.timestamp() - hello.ts
        dev.clock_offset_s = offset
    elif dev.last_seen is not None and hello.ts + (dev.clock_offset_s or 0.0) <= dev.last_seen.timestamp():
        log.debug("hello from %s: a retained copy older than the last message, ignored", device_id)
        return None
    dev.profile = hello.profile
    dev.agent_version = hello.agent_version
    dev.runtimes = dict(hello.runtimes)
    dev.tags = list(hello.tags)
    dev.platform = hello.platform or None
    dev.model = hello.model
    dev.previous_model = hello.previous_model
    dev.online = True
    dev.last_seen = now
    session.add(dev)
    return offset


def apply_presence(
    session: Session, device_id: str, presence: protocol.Presence, now: datetime
) -> None:
    """Online/offline, from the device or from its last will (sent by the broker)."""
    dev = _device(session, device_id)
    dev.online = presence.online
    if presence.online:
        dev.last_seen = now
    session.add(dev)


def apply_status(
    session: Session, device_id: str, status: protocol.StatusReport, now: datetime
) -> bool:
    """Fold a status report into the device and its deployment row.

    Returns False when the report was ignored as a duplicate or out of order.
    """
    dev = _device(session, device_id)
    # A report counted in another spool (the device's was recreated: a new SD card, a
    # reset) starts the count again, even below the last: its clock may be behind.
    same_counter = status.seq_epoch is None or status.seq_epoch == dev.last_status_epoch
    if same_counter and dev.last_status_seq is not None and status.seq <= dev.last_status_seq:
        log.debug("status from %s: seq %d <= %d, ignored", device_id, status.seq, dev.last_status_seq)
        return False
    if not same_counter and dev.last_status_seq is not None:
        log.info("status from %s: a new counter (seq_epoch %d, was %s) at seq %d", device_id,
                 status.seq_epoch, dev.last_status_epoch, status.seq)
    dev.last_status_seq = status.seq
    if status.seq_epoch is not None:
        dev.last_status_epoch = status.seq_epoch
    dev.state = status.state
    dev.outcome = status.outcome
    dev.model = status.model
    dev.previous_model = status.previous_model
    dev.target_model = status.target_model
    dev.deployment_id = status.deployment_id
    dev.conditions = list(status.conditions)
    dev.last_error = status.error
    dev.error_kind = status.error_kind
    dev.last_seen = now
    session.add(dev)
    if status.deployment_id:
        row = session.get(
            DeploymentDevice, {"device_id": device_id, "deployment_id": status.deployment_id}
        )
        if row is not None and row.outcome != "skipped":
            row.state = status.state
            row.outcome = "pending" if status.outcome == "idle" else status.outcome
            row.progress = status.progress
            row.error = status.error
            row.updated = now
            session.add(row)
    return True


def list_devices(session: Session, select_expr: str | None = None) -> list[DevicePublic]:
    """Every device the hub has heard from, by id; only those ``select_expr`` matches
    when given (see :mod:`hub.selector`).

    Raises:
        InvalidSelector: ``select_expr`` does not parse.
    """
    selector = parse_selector(select_expr) if select_expr is not None else None
    q = select(Device).order_by(col(Device.device_id))
    if selector is not None and selector.profile is not None:
        q = q.where(Device.profile == selector.profile)
    rows = session.exec(q).all()
    if selector is not None:
        rows = [d for d in rows if selector.matches(d)]
    return [DevicePublic.model_validate(d, from_attributes=True) for d in rows]


def get_device(session: Session, device_id: str) -> DevicePublic:
    """One device.

    Raises:
        DeviceNotFound: the hub has never heard from it.
    """
    dev = session.get(Device, device_id)
    if dev is None:
        raise DeviceNotFound(f"no device {device_id!r}")
    return DevicePublic.model_validate(dev, from_attributes=True)
