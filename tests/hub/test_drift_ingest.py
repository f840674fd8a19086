"""Drift sketches over MQTT: stored per device, model and window; duplicates dropped;
malformed ones counted like every other payload."""

from __future__ import annotations

from sqlmodel import select

from agent.sketch import DriftSketch, FeatureSketch, PredictionSketch
from hub.models import DriftSketchRow
from tests.hub.conftest import HubHarness, wait_until


def _sketch(start: float) -> DriftSketch:
    return DriftSketch(v=1, model="lin:1.0.0", window_start=start, window_end=start + 1, rows=3,
                       features=[FeatureSketch(counts=[1, 2])], predictions=PredictionSketch(counts=[2, 1, 0]))


def test_drift_sketches_are_stored_and_bad_ones_counted(hub: HubHarness, device_factory) -> None:  # type: ignore[no-untyped-def]
    dev = device_factory(hub.hub.broker_url)
    dev.publish("drift", _sketch(10.0).encode())
    dev.publish("drift", _sketch(10.0).encode())  # QoS 1 redelivery
    dev.publish("drift", _sketch(11.0).encode())
    dev.publish("drift", b'{"v": 1, "model": "lin:1.0.0", "rows": -1}')
    dev.publish("drift", b"not json")

    def stored() -> list[DriftSketchRow] | None:
        hub.settle()
        with hub.hub.db.session() as s:
            rows = s.exec(select(DriftSketchRow).where(DriftSketchRow.device_id == dev.device_id)).all()
        return list(rows) if len(rows) >= 2 else None

    rows = wait_until(stored)
    assert sorted(r.window_start for r in rows) == [10.0, 11.0]
    assert DriftSketch.model_validate(rows[0].sketch).predictions.counts == [2, 1, 0]  # type: ignore[union-attr]

    def counted() -> dict[str, int] | None:
        hub.settle()
        got = hub.client.get("/api/v1/stats/payload-errors").json()["by_topic"].get("drift", {})
        return got if sum(got.values()) >= 2 else None

    got = wait_until(counted)
    assert got.get("not_json") == 1 and sum(got.values()) == 2
