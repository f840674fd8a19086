"""Alert lifecycle (open, dedup, escalate/resolve, reopen), webhook delivery with
retries to a local HTTP server, and retraining triggers that fire once per episode:
after N consecutive drifted windows, and under a performance floor."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlmodel import select

from agent.bundle import Reference
from hub import alerts
from hub.api_monitoring import MonitoringState
from hub.db import Database
from hub.models_monitoring import WebhookDelivery
from hub.monitoring import MonitoringSettings
from tests.hub.conftest import wait_until
from tests.monitoring.hub_support import (
    MonHub,
    WebhookReceiver,
    add_devices,
    device_sketch,
    make_ref_bundle,
    start_hub,
    store_sketches,
)

MODEL = "clf:1.0.0"
DEVICES = [f"dev-{i}" for i in range(6)]
W = 600.0


@pytest.fixture
def hooks() -> Iterator[tuple[WebhookReceiver, WebhookReceiver]]:
    alert_hook, retrain_hook = WebhookReceiver(fail_first=2), WebhookReceiver()
    yield alert_hook, retrain_hook
    alert_hook.close()
    retrain_hook.close()


@pytest.fixture
def mon(tmp_path: Path, db_url: str, session_mosquitto: Any,
        hooks: tuple[WebhookReceiver, WebhookReceiver]) -> Iterator[MonHub]:
    settings = MonitoringSettings(
        interval_s=3600, alert_webhooks=[hooks[0].url], retrain_webhooks=[hooks[1].url],
        retrain_command=[sys.executable, "-c",
                         "import sys; open(sys.argv[1], 'a').write(sys.stdin.read() + '\\n')",
                         str(tmp_path / "retrain.log")],
        webhook_backoff_s=0.05,
    )
    stack: list[Any] = []
    h = start_hub(tmp_path, db_url, session_mosquitto.url, settings, stack)
    yield h
    for c in reversed(stack):
        c.__exit__(None, None, None)


def _state(h: MonHub) -> MonitoringState:
    st: MonitoringState = h.client.app.state.monitoring  # type: ignore[attr-defined]
    return st


def _setup(h: MonHub, reference: Reference, tmp_path: Path, policy: dict[str, Any]) -> None:
    with open(make_ref_bundle(tmp_path, reference), "rb") as fh:
        assert h.client.post("/api/v1/models", files={"bundle": ("b.efb", fh)}).status_code == 201
    add_devices(h.db, [(d, "rpi4", ["line-1"]) for d in DEVICES], model=MODEL)
    r = h.client.put("/api/v1/monitoring/policies/clf", json=policy)
    assert r.status_code == 200, r.text


def _window(h: MonHub, reference: Reference, rng: np.random.Generator, t0: float, shift: float) -> None:
    store_sketches(h.db, [(d, device_sketch(reference, MODEL, rng, t0 + 5, t0 + W - 5, rows=400, shift=shift))
                          for d in DEVICES])


def _evaluate(h: MonHub, now: float) -> alerts.Evaluation:
    st = _state(h)
    ev = alerts.evaluate(h.db, st.references, st.settings, now)
    assert ev.errors == []
    st.loop.wake()
    return ev


def _open(h: MonHub) -> dict[str, dict[str, Any]]:
    r = h.client.get("/api/v1/alerts", params={"state": "open"})
    assert r.status_code == 200
    rows = r.json()
    assert len({a["key"] for a in rows}) == len(rows), "two open alerts share a key"
    return {a["subject"]: a for a in rows}


def test_drift_alerts_and_retrain_episodes(mon: MonHub, reference: Reference, rng: np.random.Generator,
                                           tmp_path: Path, hooks: tuple[WebhookReceiver, WebhookReceiver]) -> None:
    alert_hook, retrain_hook = hooks
    _setup(mon, reference, tmp_path, {"window_s": W, "retrain_drift_windows": 3})
    t = time.time() - 20 * W
    shifts = [2.0, 2.0, 2.0, 2.0, 0.0, 2.0, 2.0, 2.0]
    for k, shift in enumerate(shifts):
        _window(mon, reference, rng, t + k * W, shift)

    def at(k: int) -> alerts.Evaluation:  # evaluate at the end of window k
        return _evaluate(mon, t + (k + 1) * W)

    ev = at(0)
    assert sorted((c.event, c.alert.subject, c.alert.severity) for c in ev.changes) == [
        ("opened", "prediction", "critical"), ("opened", "x0", "critical")]
    first_ids = {s: a["id"] for s, a in _open(mon).items()}
    assert set(first_ids) == {"x0", "prediction"} and ev.retrain_started == []

    assert at(0).changes == []  # same window again: deduplicated, nothing to notify
    assert at(1).changes == [] and at(1).retrain_started == []
    assert {s: a["id"] for s, a in _open(mon).items()} == first_ids

    ev = at(2)  # third consecutive drifted window: the trigger fires, once
    assert [(e.reason, e.model, e.details["features"]) for e in ev.retrain_started] == [
        ("drift", MODEL, ["prediction", "x0"])]
    assert at(3).retrain_started == []

    ev = at(4)  # a clean window: alerts resolve, the episode ends
    assert sorted((c.event, c.alert.subject) for c in ev.changes) == [
        ("resolved", "prediction"), ("resolved", "x0")]
    assert ev.retrain_ended == 1 and _open(mon) == {}
    resolved = mon.client.get("/api/v1/alerts", params={"state": "resolved"}).json()
    assert all(a["resolved"] >= a["opened"] for a in resolved) and len(resolved) == 2

    at(5)
    assert set(_open(mon)) == {"x0", "prediction"}
    assert not set(first_ids.values()) & {a["id"] for a in _open(mon).values()}, "a new episode opens new alerts"
    assert at(6).retrain_started == []
    assert [e.reason for e in at(7).retrain_started] == ["drift"]
    episodes = mon.client.get("/api/v1/retrain").json()
    assert [e["state"] for e in episodes] == ["active", "ended"]

    # Delivery: the alert webhook failed twice and was retried; the retrain webhook
    # and command each got exactly one event per episode.
    events = alert_hook.wait(lambda r: len(r) >= 6)
    assert sorted(e["event"] for e in events) == ["alert.opened"] * 4 + ["alert.resolved"] * 2
    assert alert_hook.attempts >= 8
    got = retrain_hook.wait(lambda r: len(r) >= 2)
    assert [e["event"] for e in got] == ["retrain", "retrain"]
    log = tmp_path / "retrain.log"
    wait_until(lambda: log.exists() and len(log.read_text().splitlines()) == 2)
    assert json.loads(log.read_text().splitlines()[0])["episode"]["reason"] == "drift"
    time.sleep(0.3)
    assert len(retrain_hook.received) == 2


def test_performance_floor_and_staleness(mon: MonHub, reference: Reference, tmp_path: Path,
                                         hooks: tuple[WebhookReceiver, WebhookReceiver]) -> None:
    _setup(mon, reference, tmp_path, {
        "window_s": W, "performance": {"metric": "accuracy", "floor": 0.8, "min_samples": 50},
        "max_age_days": 1e-6,
    })
    t = time.time()  # evaluations run after the upload, so the version has an age

    def feedback(k: int, correct: int, n: int = 100) -> None:
        items = [{"model": MODEL, "ts": t + k * W + i, "label": i % 2,
                  "prediction": i % 2 if i < correct else 1 - i % 2} for i in range(n)]
        assert mon.client.post("/api/v1/feedback", json={"items": items}).status_code == 200

    feedback(0, 60)           # accuracy 0.6
    feedback(1, 70)           # 0.7
    feedback(2, 95)           # 0.95
    feedback(3, 30, n=40)     # too few rows to judge

    ev = _evaluate(mon, t + W)
    subjects = {(c.event, c.alert.subject, c.alert.severity) for c in ev.changes}
    assert subjects == {("opened", "performance:accuracy", "critical"), ("opened", "staleness", "warning")}
    assert _open(mon)["performance:accuracy"]["value"] == pytest.approx(0.6)
    assert [e.reason for e in ev.retrain_started] == ["performance"]
    ev = _evaluate(mon, t + 2 * W)
    assert ev.changes == [] and ev.retrain_started == []  # still under: same alert, same episode
    assert _open(mon)["performance:accuracy"]["value"] == pytest.approx(0.7)
    ev = _evaluate(mon, t + 3 * W)
    assert [(c.event, c.alert.subject) for c in ev.changes] == [("resolved", "performance:accuracy")]
    assert ev.retrain_ended == 1
    ev = _evaluate(mon, t + 4 * W)  # 40 rows < min_samples: no verdict, nothing changes
    assert ev.changes == [] and ev.retrain_started == []
    assert set(_open(mon)) == {"staleness"}
    hooks[1].wait(lambda r: len(r) == 1)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_synthetic_suite_alerts_only_on_drifted_features(mon: MonHub, reference: Reference,
                                                         rng: np.random.Generator, tmp_path: Path) -> None:
    """20 devices: mean shift (x0), variance change (x1), category mix (c5) alert, and
    nothing else does; 20 no-change windows raise nothing."""
    _setup(mon, reference, tmp_path, {"window_s": W, "retrain_drift_windows": 0})
    fleet = [f"sim-{i:02d}" for i in range(20)]
    add_devices(mon.db, [(d, "rpi4", []) for d in fleet], model=MODEL)
    t = time.time() - 30 * W
    quiet = 20
    for k in range(quiet):
        store_sketches(mon.db, [(d, device_sketch(reference, MODEL, rng, t + k * W + 1, t + (k + 1) * W - 1))
                                for d in fleet + DEVICES])
        assert _evaluate(mon, t + (k + 1) * W).changes == [], f"false alert in no-change window {k}"
    k = quiet
    store_sketches(mon.db, [
        (d, device_sketch(reference, MODEL, rng, t + k * W + 1, t + (k + 1) * W - 1, shift=0.6, scale=1.6,
                          cat_p=np.array([0.1, 0.2, 0.3, 0.4])))
        for d in fleet + DEVICES])
    ev = _evaluate(mon, t + (k + 1) * W)
    assert {c.alert.subject for c in ev.changes if c.event == "opened"} == {"x0", "x1", "c5", "prediction"}


def test_delivery_backoff_then_failed(tmp_path: Path) -> None:
    """Outbox retries back off exponentially and give up after webhook_max_attempts;
    a sender that succeeds marks the row delivered."""
    db = Database(f"sqlite:///{tmp_path / 'outbox.db'}")
    db.migrate()
    settings = MonitoringSettings(webhook_max_attempts=3, webhook_backoff_s=10)
    with db.session() as s:
        s.add(WebhookDelivery(event="alert.opened", target="http://127.0.0.1:9/x", payload={"n": 1}))
        s.add(WebhookDelivery(event="retrain", target="http://127.0.0.1:9/y", payload={"n": 2}))
    calls: list[str] = []

    def flaky(d: WebhookDelivery) -> None:
        calls.append(d.target)
        if d.target.endswith("/x"):
            raise RuntimeError("HTTP 503")

    t = time.time() + 1
    assert alerts.deliver_due(db, settings, t, flaky) == alerts.DeliveryReport(delivered=1, retried=1)
    assert alerts.deliver_due(db, settings, t + 9, flaky) == alerts.DeliveryReport()  # not due before 10 s
    assert alerts.deliver_due(db, settings, t + 10.5, flaky) == alerts.DeliveryReport(retried=1)
    assert alerts.deliver_due(db, settings, t + 25, flaky) == alerts.DeliveryReport()  # next after 20 s more
    assert alerts.deliver_due(db, settings, t + 31, flaky) == alerts.DeliveryReport(failed=1)
    assert alerts.deliver_due(db, settings, t + 10_000, flaky) == alerts.DeliveryReport()
    with db.session() as s:
        rows = {r.target[-1]: r for r in s.exec(select(WebhookDelivery)).all()}
    assert (rows["x"].state, rows["x"].attempts, rows["x"].last_error) == ("failed", 3, "HTTP 503")
    assert (rows["y"].state, rows["y"].attempts) == ("delivered", 1)
    assert calls.count("http://127.0.0.1:9/x") == 3
    db.dispose()


def test_alert_listing_rejects_unknown_state(mon: MonHub) -> None:
    assert mon.client.get("/api/v1/alerts", params={"state": "bogus"}).status_code == 400
    assert mon.client.get("/api/v1/retrain", params={"state": "bogus"}).status_code == 400
    assert mon.client.put("/api/v1/monitoring/policies/nosuch", json={}).status_code == 404
    r = mon.client.put("/api/v1/monitoring/policies/nosuch", json={"thresholds": {"psi_warn": 0.5,
                                                                                   "psi_alert": 0.2}})
    assert r.status_code == 422
