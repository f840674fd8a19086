"""Devices with wrong clocks: the hub measures each device's offset from its live
hello and moves that device's timestamps onto its own clock."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import pytest
from sqlmodel import select

from agent import protocol
from agent.bundle import FeatureReference, Reference
from agent.sketch import SketchAccumulator
from hub.models import DriftSketchRow, Telemetry
from tests.hub.conftest import HubHarness, SimDevice, wait_until

HOUR = 3600.0


def _device(h: HubHarness, device_id: str) -> dict:  # type: ignore[type-arg]
    r = h.client.get(f"/api/v1/devices/{device_id}")
    return r.json() if r.status_code == 200 else {}


def _sketch(device_now: float) -> protocol.Payload:
    ref = Reference(features=[FeatureReference(name="f0", edges=[-1.0, 0.0, 1.0], counts=[1, 1])])
    acc = SketchAccumulator(ref, "tiny:1.0.0", start=device_now - 60)
    acc.update(np.random.default_rng(0).normal(size=(100, 1)).astype(np.float32), None)
    return acc.snapshot_and_reset(device_now)  # type: ignore[return-value]


@pytest.mark.parametrize("skew", [-HOUR, 0.0, 5 * HOUR])
def test_device_timestamps_are_moved_onto_the_hub_clock(
    hub: HubHarness, device_factory: Callable[..., SimDevice], session_mosquitto, skew: float  # type: ignore[no-untyped-def]
) -> None:
    dev = device_factory(session_mosquitto.url)
    # skew < 0: the device clock is behind the hub's by |skew|
    dev.hello(ts=time.time() + skew)
    d = wait_until(lambda: _device(hub, dev.device_id).get("clock_offset_s") is not None and _device(hub, dev.device_id))
    assert d["clock_offset_s"] == pytest.approx(-skew, abs=2.0)

    device_now = time.time() + skew
    dev.publish("telemetry", protocol.Telemetry(
        seq=1, window_start=device_now - 10, window_end=device_now, model="tiny:1.0.0",
        inference_count=10, error_count=0, ts=device_now))
    sk = _sketch(device_now)
    dev.publish("drift", sk.encode())  # type: ignore[attr-defined]
    time.sleep(0.3)
    hub.settle()
    now = time.time()
    with hub.hub.db.session() as s:
        t = s.exec(select(Telemetry).where(Telemetry.device_id == dev.device_id)).one()
        row = s.exec(select(DriftSketchRow).where(DriftSketchRow.device_id == dev.device_id)).one()
    assert t.window_end == pytest.approx(now, abs=3.0) and t.window_end - t.window_start == pytest.approx(10)
    assert row.window_end == pytest.approx(now, abs=3.0)
    assert row.sketch["window_end"] == pytest.approx(row.window_end)


def test_a_retained_hello_does_not_measure_the_offset(
    hub_factory: Callable[..., HubHarness], db_url: str, device_factory: Callable[..., SimDevice],
    session_mosquitto,  # type: ignore[no-untyped-def]
) -> None:
    dev = device_factory(session_mosquitto.url)
    dev.hello(ts=time.time() - 10 * HOUR)  # retained on the broker, stale by the time a hub starts
    time.sleep(0.3)
    h = hub_factory(db_url, session_mosquitto.url)
    d = wait_until(lambda: _device(h, dev.device_id).get("profile") and _device(h, dev.device_id))
    assert d["clock_offset_s"] is None
