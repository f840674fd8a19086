"""Labels and captured samples that devices send over MQTT (real Mosquitto, SQLite
and PostgreSQL): stored once, scoped by device, scored like REST feedback; hostile
messages are refused, counted by kind, and change nothing."""

from __future__ import annotations

import io
import json
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sklearn import metrics as skm

from agent import protocol
from agent.bundle import Reference
from agent.capture import sample_arrays
from hub.monitoring import MonitoringSettings
from tests.hub.conftest import SimDevice
from tests.monitoring.hub_support import MonHub, make_ref_bundle, start_hub


@pytest.fixture
def mon(tmp_path: Path, db_url: str, session_mosquitto: Any, reference: Reference) -> Iterator[MonHub]:
    stack: list[Any] = []
    h = start_hub(tmp_path, db_url, session_mosquitto.url, MonitoringSettings(interval_s=3600), stack)
    with open(make_ref_bundle(tmp_path, reference, name="clf"), "rb") as fh:
        assert h.client.post("/api/v1/models", files={"bundle": ("b.efb", fh)}).status_code == 201
    yield h
    for c in reversed(stack):
        c.__exit__(None, None, None)


@pytest.fixture
def device(session_mosquitto: Any) -> Iterator[SimDevice]:
    d = SimDevice(session_mosquitto.url)
    yield d
    d.client.loop_stop()
    d.client.disconnect()


def _settle(mon: MonHub) -> None:
    time.sleep(0.3)  # let the broker hand the messages over
    assert mon.hub.mqtt.wait_idle(15)


def _errors(mon: MonHub, topic_kind: str) -> dict[str, int]:
    by_topic: dict[str, dict[str, int]] = mon.client.get("/api/v1/stats/payload-errors").json()["by_topic"]
    return by_topic.get(topic_kind, {})


def _labels(rng: np.random.Generator, n: int, prefix: str = "r") -> tuple[list[dict[str, Any]], np.ndarray, np.ndarray]:
    y = rng.integers(0, 3, n)
    p = np.where(rng.random(n) < 0.7, y, rng.integers(0, 3, n))
    now = time.time()
    items = [{"model": "clf:1.0.0", "request_id": f"{prefix}{i}", "ts": now - 10, "label": int(a),
              "prediction": int(b)} for i, (a, b) in enumerate(zip(y, p, strict=True))]
    return items, y, p


def test_device_labels_are_scored_once_and_scoped_by_device(
    mon: MonHub, device: SimDevice, session_mosquitto: Any, rng: np.random.Generator
) -> None:
    items, y, p = _labels(rng, 120)
    msg = protocol.Feedback(seq=0, items=[protocol.LabelRecord(**i) for i in items])
    device.publish("feedback", msg)
    device.publish("feedback", msg)  # a QoS 1 redelivery
    other = SimDevice(session_mosquitto.url)  # same request ids, another device: not duplicates
    try:
        other.publish("feedback", protocol.Feedback(seq=0, items=msg.items[:20]))
        _settle(mon)
    finally:
        other.client.loop_stop()
        other.client.disconnect()
    rep = mon.client.get("/api/v1/performance/clf", params={"window": "1h", "periods": 1}).json()
    (v,) = rep["versions"]
    assert v["overall"]["n"] == 140
    y_all, p_all = np.concatenate([y, y[:20]]), np.concatenate([p, p[:20]])
    assert v["overall"]["accuracy"] == pytest.approx(skm.accuracy_score(y_all, p_all), abs=1e-12)
    assert v["overall"]["f1"] == pytest.approx(
        skm.f1_score(y_all, p_all, average="macro", zero_division=0), abs=1e-12)
    assert _errors(mon, "feedback") == {}


def test_hostile_device_feedback_is_refused_and_counted(
    mon: MonHub, device: SimDevice, rng: np.random.Generator
) -> None:
    items, _, _ = _labels(rng, 5)
    good = {"v": 1, "seq": 0, "items": items}
    bad: list[bytes] = [
        b"{not json",
        json.dumps(good).encode()[:60],  # truncated
        json.dumps({**good, "v": 7}).encode(),
        json.dumps({**good, "items": [{**items[0], "label": True}]}).encode(),
        json.dumps({**good, "items": [{**items[0], "prediction": "cat"}]}).encode(),  # type mismatch
        json.dumps({**good, "items": [{**items[0], "model": "nope:9.9.9"}]}).encode(),
        json.dumps({**good, "items": [{**items[0], "ts": -1}]}).encode(),
        json.dumps({**good, "items": items * 300}).encode(),  # over MAX_FEEDBACK_ITEMS and the size limit
        b"{" + b" " * (protocol.MAX_JSON_PAYLOAD + 10) + b"}",
    ]
    for b in bad:
        device.publish("feedback", b)
    _settle(mon)
    errs = _errors(mon, "feedback")
    assert sum(errs.values()) == len(bad), errs
    assert {"not_json", "version", "schema", "unknown_model", "oversized"} <= set(errs)
    rep = mon.client.get("/api/v1/performance/clf", params={"window": "1h", "periods": 1}).json()
    assert all(v["overall"]["n"] == 0 for v in rep["versions"])


def _npz(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _capture(sample_id: str, arrays: dict[str, np.ndarray] | None = None, model: str = "clf:1.0.0") -> bytes:
    x = np.arange(4, dtype=np.float32).reshape(1, 4)
    data = _npz(arrays if arrays is not None else {"in/x": x, "out/y": x[:, :3] * 2})
    return protocol.encode_capture(protocol.CaptureHeader(sample_id=sample_id, model=model, ts=time.time()), data)


def test_captured_samples_are_archived_listed_and_downloaded(mon: MonHub, device: SimDevice) -> None:
    for i in range(3):
        device.publish("capture", _capture(f"s{i}"))
    device.publish("capture", _capture("s0"))  # redelivered
    _settle(mon)
    rows = mon.client.get("/api/v1/captures", params={"model": "clf"}).json()
    assert [r["sample_id"] for r in rows] == ["s2", "s1", "s0"]
    assert all(r["device_id"] == device.device_id and r["model_version"] == "1.0.0" for r in rows)
    r = mon.client.get(f"/api/v1/captures/{rows[-1]['id']}/npz")
    assert r.status_code == 200 and r.headers["content-type"] == "application/octet-stream"
    inputs, outputs = sample_arrays(r.content)
    np.testing.assert_array_equal(inputs["x"], np.arange(4, dtype=np.float32).reshape(1, 4))
    assert mon.client.get("/api/v1/captures/999999/npz").status_code == 404
    assert mon.client.get("/api/v1/captures", params={"device": "someone-else"}).json() == []


def test_hostile_captures_are_refused_and_counted(mon: MonHub, device: SimDevice) -> None:
    flipped = bytearray(_capture("flip"))
    flipped[-3] ^= 0x01
    bomb = io.BytesIO()
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as z:
        arr = io.BytesIO()
        np.save(arr, np.zeros(30_000_000, np.uint8))
        z.writestr("in/x.npy", arr.getvalue())
    bomb_frame = protocol.encode_capture(
        protocol.CaptureHeader(sample_id="bomb", model="clf:1.0.0", ts=1.0), bomb.getvalue())
    pickled = io.BytesIO()
    np.savez(pickled, **{"in/x": np.array([{"a": 1}], dtype=object)})
    pickle_frame = protocol.encode_capture(
        protocol.CaptureHeader(sample_id="pkl", model="clf:1.0.0", ts=1.0), pickled.getvalue())
    bad = [
        b"",
        b"EFS1",
        _capture("t")[:30],  # truncated header
        bytes(flipped),
        bomb_frame,
        pickle_frame,
        _capture("unknown", model="other:1.0.0"),
        _capture("noinput", arrays={"out/y": np.zeros(3, np.float32)}),
        _capture("big", arrays={"in/x": np.zeros(400_000, np.float32)}),  # 1.6 MB: over the frame limit
    ]
    for b in bad:
        device.publish("capture", b)
    _settle(mon)
    errs = _errors(mon, "capture")
    assert sum(errs.values()) == len(bad), errs
    assert {"not_frame", "chunk_hash", "sample", "unknown_model", "oversized"} <= set(errs)
    assert mon.client.get("/api/v1/captures").json() == []
    assert not list((mon.hub.settings.data_dir / "captures").rglob("*.efs"))


def test_capture_archive_is_bounded(
    tmp_path: Path, db_url: str, session_mosquitto: Any, reference: Reference, device: SimDevice
) -> None:
    stack: list[Any] = []
    h = start_hub(tmp_path, db_url, session_mosquitto.url, MonitoringSettings(interval_s=3600), stack)
    try:
        h.hub.captures.max_bytes = 3 * 300_000
        with open(make_ref_bundle(tmp_path, reference, name="clf"), "rb") as fh:
            assert h.client.post("/api/v1/models", files={"bundle": ("b.efb", fh)}).status_code == 201
        for i in range(6):
            device.publish("capture", _capture(f"s{i}", {"in/x": np.full(70_000, i, np.float32)}))
        _settle(h)
        rows = h.client.get("/api/v1/captures").json()
        assert [r["sample_id"] for r in rows] == ["s5", "s4", "s3"]
        assert h.hub.captures.evicted == 3
        files = sorted(p.stem for p in (h.hub.settings.data_dir / "captures").rglob("*.efs"))
        assert files == ["s3", "s4", "s5"]
    finally:
        for c in reversed(stack):
            c.__exit__(None, None, None)
