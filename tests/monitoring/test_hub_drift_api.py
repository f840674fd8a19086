"""GET /api/v1/drift returns exactly what hub.drift computes from the stored sketches,
per cohort and window, on SQLite and PostgreSQL; hostile stored rows are skipped
and counted without touching the statistics."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.bundle import Reference
from agent.sketch import DriftSketch
from hub import drift
from hub.monitoring import MonitoringSettings
from tests.monitoring.hub_support import (
    MonHub,
    add_devices,
    device_sketch,
    make_ref_bundle,
    start_hub,
    store_raw_sketch,
    store_sketches,
)

MODEL = "clf:1.0.0"
CANARY = [f"can-{i}" for i in range(4)]
STABLE = [f"sta-{i}" for i in range(4)]


@pytest.fixture
def mon(tmp_path: Path, db_url: str, session_mosquitto: Any) -> Iterator[MonHub]:
    stack: list[Any] = []
    h = start_hub(tmp_path, db_url, session_mosquitto.url, MonitoringSettings(interval_s=3600), stack)
    yield h
    for c in reversed(stack):
        c.__exit__(None, None, None)


def upload(h: MonHub, path: Path) -> None:
    with open(path, "rb") as fh:
        r = h.client.post("/api/v1/models", files={"bundle": (path.name, fh, "application/octet-stream")})
    assert r.status_code == 201, r.text


def seed(h: MonHub, reference: Reference, rng: np.random.Generator, tmp_path: Path,
         now: float) -> dict[str, list[DriftSketch]]:
    upload(h, make_ref_bundle(tmp_path, reference))
    add_devices(h.db, [(d, "rpi4", ["canary"]) for d in CANARY], model=MODEL)
    add_devices(h.db, [(d, "x86", ["stable"]) for d in STABLE], model=MODEL)
    by_dev: dict[str, list[DriftSketch]] = {}
    items = []
    for d in CANARY + STABLE:
        shift = 1.5 if d in CANARY else 0.0
        for k in range(3):
            t0 = now - 3000 + k * 600
            sk = device_sketch(reference, MODEL, rng, t0, t0 + 600, shift=shift)
            by_dev.setdefault(d, []).append(sk)
            items.append((d, sk))
        # Two hours ago, far outside a 1 h window: must never be merged.
        items.append((d, device_sketch(reference, MODEL, rng, now - 7200, now - 6600, shift=5.0)))
    store_sketches(h.db, items)
    return by_dev


def _merged(reference: Reference, by_dev: dict[str, list[DriftSketch]], devices: list[str]) -> drift.MergedSketch:
    return drift.merge([s for d in devices for s in by_dev[d]], reference=reference, model=MODEL)


def _dump(rows: list[drift.FeatureDrift]) -> list[dict[str, Any]]:
    return [r.model_dump(mode="json") for r in rows]


def _same_but_kll(got: list[dict[str, Any]], want: list[dict[str, Any]]) -> None:
    """Equal, except KLL KS: DataSketches compaction is randomised, so two merges of the
    same sketches agree only within the sketch error (0.027 at k = 200)."""
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        if w["ks_method"] == "kll":
            assert g["ks_method"] == "kll" and abs(g["ks"] - w["ks"]) <= 0.03
            g, w = {**g, "ks": None}, {**w, "ks": None}
        assert g == w


def test_drift_api_matches_hub_drift(mon: MonHub, reference: Reference, rng: np.random.Generator,
                                     tmp_path: Path) -> None:
    now = time.time()
    by_dev = seed(mon, reference, rng, tmp_path, now)
    expected = drift.drift_report(reference, _merged(reference, by_dev, CANARY + STABLE))

    r = mon.client.get("/api/v1/drift/clf/1.0.0?window=1h")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["devices"] == 8 and body["sketches"] == 24 and body["rows"] == 24 * 300
    assert body["features"] + [body["prediction"]] == _dump(expected)
    status = {f["feature"]: f["status"] for f in body["features"]}
    assert status.pop("x0") == "alert" and set(status.values()) == {"ok"}, status
    assert body["status"] == "alert"
    for f in body["features"]:
        assert {"feature", "psi", "ks", "status", "js", "chi2_p", "rows"} <= f.keys()

    # The latest version is the default; the thresholds are the documented defaults.
    latest = mon.client.get("/api/v1/drift/clf").json()
    assert latest["version"] == "1.0.0" and latest["features"] == body["features"]
    assert body["thresholds"]["psi_warn"] == 0.1 and body["thresholds"]["psi_alert"] == 0.25

    # A cohort, and the cohort against a control cohort.
    r = mon.client.get("/api/v1/drift/clf/1.0.0", params={"select": "tag=stable", "window": "60m",
                                                           "control": "profile=rpi4"})
    body = r.json()
    assert r.status_code == 200 and body["cohort"] == "tag=stable" and body["devices"] == 4
    stable = _merged(reference, by_dev, STABLE)
    assert body["features"] + [body["prediction"]] == _dump(drift.drift_report(reference, stable))
    assert body["status"] == "ok"
    cmp = drift.compare_cohorts(_merged(reference, by_dev, CANARY), stable, reference=reference)
    _same_but_kll(body["control_features"] + [body["prediction_vs_control"]], _dump(cmp))
    assert body["control_devices"] == 4
    x0 = body["control_features"][0]
    assert x0["feature"] == "x0" and x0["status"] == "alert" and x0["ks_method"] == "kll"

    # One device by id: only its own sketches.
    one = mon.client.get("/api/v1/drift/clf/1.0.0", params={"select": f"id={CANARY[0]}"}).json()
    assert one["devices"] == 1 and one["sketches"] == 3


def test_hostile_rows_are_skipped_and_counted(mon: MonHub, reference: Reference,
                                              rng: np.random.Generator, tmp_path: Path) -> None:
    now = time.time()
    by_dev = seed(mon, reference, rng, tmp_path, now)
    clean = mon.client.get("/api/v1/drift/clf/1.0.0").json()
    good = by_dev[CANARY[0]][0].model_dump(mode="json", exclude_defaults=True)
    negative = {**good, "features": [{**good["features"][0], "counts": [-5] + good["features"][0]["counts"][1:]},
                                     *good["features"][1:]]}
    store_raw_sketch(mon.db, CANARY[1], MODEL, now - 500, negative)
    store_raw_sketch(mon.db, CANARY[1], MODEL, now - 400, {**good, "rows": "300"})
    store_raw_sketch(mon.db, CANARY[1], MODEL, now - 300, {"v": 1, "model": MODEL})
    # Valid on its own, but the wrong layout for this model's reference.
    short = DriftSketch.model_validate(
        {**good, "features": good["features"][:2], "window_start": now - 200, "window_end": now - 100}
    )
    store_sketches(mon.db, [(STABLE[0], short)])

    body = mon.client.get("/api/v1/drift/clf/1.0.0").json()
    assert body["rejected"] == {"stored_invalid": 3, "shape": 1}
    assert body["features"] == clean["features"] and body["prediction"] == clean["prediction"]
    assert body["sketches"] == clean["sketches"]


BAD_QUERIES = [
    ("/api/v1/drift/nosuch", 404),
    ("/api/v1/drift/clf/9.9.9", 404),
    ("/api/v1/drift/clf/1.0.0?select=colour=red", 400),
    ("/api/v1/drift/clf/1.0.0?select=all,tag=x", 400),
    ("/api/v1/drift/clf/1.0.0?window=forever", 400),
    ("/api/v1/drift/clf/1.0.0?window=0s", 400),
    ("/api/v1/drift/clf/1.0.0?window=400d", 400),
    ("/api/v1/drift/clf/1.0.0?control=profile=", 400),
    ("/api/v1/drift/noref/1.0.0", 409),
]


def test_bad_queries(mon: MonHub, reference: Reference, tmp_path: Path) -> None:
    upload(mon, make_ref_bundle(tmp_path, reference))
    upload(mon, make_ref_bundle(tmp_path, Reference(), name="noref"))
    for url, status in BAD_QUERIES:
        r = mon.client.get(url)
        assert r.status_code == status, (url, r.text)
        assert isinstance(r.json()["detail"], str)
