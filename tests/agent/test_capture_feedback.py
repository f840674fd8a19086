"""Opt-in sample capture and on-device label feedback: the store, the wire formats,
and the agent sending both over a real Mosquitto broker."""

from __future__ import annotations

import io
import json
import struct
import time
import zipfile

import numpy as np
import paho.mqtt.client as mqtt
import pytest

from agent import topics
from agent.capture import CaptureStore, read_sample, sample_arrays
from agent.errors import PayloadError
from agent.protocol import (
    MAX_FEEDBACK_ITEMS,
    CaptureHeader,
    Feedback,
    Telemetry,
    decode,
    decode_capture,
    encode_capture,
)
from tests.support import free_port

X = np.arange(8, dtype=np.float32).reshape(2, 4)
Y = np.ones((2, 3), dtype=np.float32)


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def _store(tmp_path, **kw) -> tuple[CaptureStore, Clock]:
    clock = Clock()
    kw = {"per_minute": 60.0, "max_bytes": 1 << 20, "max_sample_bytes": 64 * 1024} | kw
    return CaptureStore(tmp_path / "cap", clock=clock, **kw), clock


# ---------------------------------------------------------------- store


def test_rate_limit_admits_at_most_per_minute_and_banks_nothing(tmp_path):
    store, clock = _store(tmp_path, per_minute=60.0)
    admitted = 0
    for _ in range(600):  # 60 s of calls every 0.1 s
        admitted += store.admit()
        clock.t += 0.1
    assert 59 <= admitted <= 61
    clock.t += 3600  # an idle hour does not bank a burst
    assert [store.admit() for _ in range(5)] == [True, False, False, False, False]


def test_samples_round_trip_and_the_cap_evicts_oldest(tmp_path):
    one = len(encode_capture(CaptureHeader(sample_id="x", model="m:1", ts=1.0), _npz()))
    store, _ = _store(tmp_path, max_bytes=3 * one + 100, max_sample_bytes=1024)
    ids = [store.add("m:1.0.0", 1000.0 + i, {"input": X + i}, {"logits": Y}) for i in range(5)]
    assert all(ids)
    assert len(store) == 3 and store.counts["evicted"] == 2 and store.counts["captured"] == 5
    assert store.size_bytes <= store.max_bytes
    files = sorted((tmp_path / "cap").glob("*.efs"))
    assert [f.stem for f in files] == ids[2:]
    header, inputs, outputs = read_sample(files[0])
    assert header.model == "m:1.0.0" and header.ts == 1002.0
    np.testing.assert_array_equal(inputs["input"], X + 2)
    np.testing.assert_array_equal(outputs["logits"], Y)


def test_oversized_samples_are_skipped_and_counted(tmp_path):
    store, _ = _store(tmp_path, max_sample_bytes=1024)
    assert store.add("m:1", 1.0, {"input": np.zeros((64, 64), np.float32)}, {}) is None
    assert store.counts["oversized"] == 1 and len(store) == 0


def test_store_survives_restart_and_upload_order_is_oldest_first(tmp_path):
    store, _ = _store(tmp_path)
    first = store.add("m:1", 1.0, {"input": X}, {"logits": Y})
    second = store.add("m:1", 2.0, {"input": X}, {"logits": Y})
    (tmp_path / "cap" / "half-written.efs.tmp").write_bytes(b"EFS1\x00")
    store2, _ = _store(tmp_path)
    assert len(store2) == 2 and not list((tmp_path / "cap").glob("*.tmp"))
    name, frame = store2.oldest()
    assert name == f"{first}.efs"
    assert decode_capture(frame)[0].sample_id == first
    store2.remove(name)
    assert store2.oldest()[0] == f"{second}.efs" and store2.counts["uploaded"] == 1


def test_store_refuses_nonsense_settings(tmp_path):
    with pytest.raises(ValueError, match="per_minute"):
        CaptureStore(tmp_path, per_minute=0, max_bytes=1 << 20)
    with pytest.raises(ValueError, match="max_bytes"):
        CaptureStore(tmp_path, per_minute=1, max_bytes=10, max_sample_bytes=1024)


# ---------------------------------------------------------------- wire formats


def _npz(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **(arrays or {"in/input": X, "out/logits": Y}))
    return buf.getvalue()


def _frame(data: bytes, **kw) -> bytes:
    return encode_capture(CaptureHeader(sample_id="s1", model="m:1.0.0", ts=1.0, **kw), data)


def test_capture_frame_round_trip():
    header, data = decode_capture(_frame(_npz()))
    inputs, outputs = sample_arrays(data)
    assert header.sample_id == "s1" and set(inputs) == {"input"} and set(outputs) == {"logits"}


@pytest.mark.parametrize(
    ("frame", "kind"),
    [
        (b"", "not_frame"),
        (b"EFC1" + b"\x00" * 8, "not_frame"),  # a chunk frame's magic
        (b"EFS1\x00\x00", "not_frame"),  # truncated length
        (b"EFS1" + struct.pack(">I", 10_000) + b"{}", "not_frame"),  # header length over the limit
        (b"EFS1" + struct.pack(">I", 50) + b"{}", "not_frame"),  # header truncated
        (b"EFS1" + struct.pack(">I", 2) + b"[]", "schema"),
        (b"EFS1" + struct.pack(">I", 8) + b"{\"v\": 9}", "version"),
    ],
)
def test_malformed_capture_frames_are_refused(frame, kind):
    with pytest.raises(PayloadError) as e:
        decode_capture(frame)
    assert e.value.kind == kind


def test_capture_frame_hash_size_and_id_checks():
    frame = bytearray(_frame(_npz()))
    frame[-1] ^= 0xFF
    with pytest.raises(PayloadError, match="sha256"):
        decode_capture(bytes(frame))
    with pytest.raises(PayloadError) as e:
        decode_capture(_frame(b"\x00" * 5000), limit=4096)
    assert e.value.kind == "oversized"
    with pytest.raises(ValueError):
        CaptureHeader(sample_id="../../etc/passwd", model="m:1", ts=1.0)


def _bomb() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as z:
        arr = io.BytesIO()
        np.save(arr, np.zeros(20_000_000, np.uint8))
        z.writestr("in/input.npy", arr.getvalue())
    return buf.getvalue()


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"not an archive", "not a valid npz"),
        (_npz()[:40], "not a valid npz|corrupt"),
        (_npz(**{"weights": X}), "neither"),
        (_npz(**{"out/logits": Y}), "no input"),
        (_npz(**{f"in/x{i}": X for i in range(70)}), "exceed"),
        (b"\x93NUMPY" + b"\x00" * 20, "not a valid npz|not an npz"),
    ],
)
def test_malformed_samples_are_refused(data, match):
    with pytest.raises(ValueError, match=match):
        sample_arrays(data)


def test_zip_bomb_and_pickles_are_refused():
    bomb = _bomb()
    assert len(bomb) < 100_000
    with pytest.raises(ValueError, match="unpacked"):
        sample_arrays(bomb)
    buf = io.BytesIO()
    np.savez(buf, **{"in/x": np.array([{"a": 1}], dtype=object)})
    with pytest.raises(ValueError):
        sample_arrays(buf.getvalue())


@pytest.mark.parametrize(
    ("items", "match"),
    [
        ([{"model": "m:1", "ts": 1.0, "label": True, "prediction": 1}], "boolean"),
        ([{"model": "m:1", "ts": 1.0, "label": 1}], "prediction"),
        ([{"model": "m:1", "ts": float("nan"), "label": 1, "prediction": 1}], "ts"),
        ([{"model": "m:1", "ts": -5, "label": 1, "prediction": 1}], "ts"),
        # The hub's rules, so that a batch the device sends is never refused there:
        ([{"model": "m:1", "ts": 1.0, "label": "x" * 129, "prediction": "y"}], "1-128 characters"),
        ([{"model": "m:1", "ts": 1.0, "label": 2**53 + 1, "prediction": 1}], "53 bits"),
        ([{"model": "m:1", "ts": 1.0, "label": 1, "prediction": 1, "score": {}}], "1-1000 labels"),
        ([{"model": "m:1", "ts": 1.0, "label": 1e17, "prediction": 1}], "fraction or exponent"),  # not an int past 2^53
        ([{"model": "m:1", "ts": 1.0, "label": 1, "prediction": 1, "score": {"x" * 129: 0.5}}],
         "score map labels must be 1-128"),
        ([{"model": "m1.0", "ts": 1.0, "label": 1, "prediction": 1}], "name:version"),
        ([{"model": "m:1", "ts": 1.0, "label": 1, "prediction": "1"}], "same type"),
        ([], "items"),
        ([{"model": "m:1", "ts": 1.0, "label": 1, "prediction": 1}] * (MAX_FEEDBACK_ITEMS + 1), "items"),
    ],
)
def test_malformed_feedback_messages_are_refused(items, match):
    data = json.dumps({"v": 1, "seq": 0, "items": items}).encode()
    with pytest.raises(PayloadError, match=match):
        decode(Feedback, data)
    with pytest.raises(PayloadError) as e:
        decode(Feedback, data[: len(data) // 2])
    assert e.value.kind == "not_json"


# ---------------------------------------------------------------- the agent, over Mosquitto


def _collect(bench, device_id: str, kind: str) -> list[bytes]:
    got: list[bytes] = []
    sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    sub.on_message = lambda c, u, m: got.append(bytes(m.payload))
    sub.connect("127.0.0.1", bench.broker.port)
    sub.subscribe(topics.device_topic(device_id, kind), qos=1)
    sub.loop_start()
    bench.closers.append(sub.loop_stop)
    return got


def _until(cond, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not cond():
        time.sleep(0.05)
    assert cond()


def test_capture_is_off_by_default(bench):
    captures = _collect(bench, "dev1", "capture")
    a = bench.agent()
    tp, man, _w, _b = bench.bundle()
    bench.deploy("dev1", "d1", tp, man.ref)
    assert bench.wait_for(a, "d1") == "installed"
    for _ in range(20):
        a.infer({"input": X[:1]})
    time.sleep(1.0)
    assert a.capture is None and captures == []
    assert not (bench.tmp / "dev1" / "captures").exists()


def test_agent_captures_at_the_rate_limit_and_uploads(bench):
    captures = _collect(bench, "dev2", "capture")
    telemetry = _collect(bench, "dev2", "telemetry")
    a = bench.agent("dev2", capture_per_minute=600.0, capture_upload=True)  # one per 0.1 s
    tp, man, w, b = bench.bundle()
    bench.deploy("dev2", "d1", tp, man.ref)
    assert bench.wait_for(a, "d1") == "installed"
    t0 = time.monotonic()
    for i in range(200):
        a.infer({"input": X[:1] + i})
        time.sleep(0.005)
    elapsed = time.monotonic() - t0
    _until(lambda: a.capture is not None and len(a.capture) == 0 and a.capture.counts["captured"] > 0)
    n = a.capture.counts["captured"]
    assert 1 <= n <= elapsed / 0.1 + 2, (n, elapsed)
    _until(lambda: len(captures) == n)
    header, data = decode_capture(captures[0])
    inputs, outputs = sample_arrays(data)
    assert header.model == man.ref
    np.testing.assert_allclose(outputs["logits"], inputs["input"] @ w + b, rtol=1e-5, atol=1e-5)
    _until(lambda: any(decode(Telemetry, t).capture for t in telemetry))
    assert a.capture.counts["uploaded"] == n


def test_agent_sends_label_feedback_in_batches(bench):
    got = _collect(bench, "dev3", "feedback")
    a = bench.agent("dev3")
    with pytest.raises(ValueError, match="no model"):
        a.feedback(1, 1)
    tp, man, _w, _b = bench.bundle()
    bench.deploy("dev3", "d1", tp, man.ref)
    assert bench.wait_for(a, "d1") == "installed"
    for i in range(25):
        a.feedback(i % 3, (i + 1) % 3, request_id=f"r{i}", score={"0": 0.2, "1": 0.5, "2": 0.3})
    with pytest.raises(ValueError, match="same type"):
        a.feedback(1, "cat")
    with pytest.raises(ValueError, match="label"):
        a.feedback(True, 1)
    _until(lambda: sum(len(decode(Feedback, m).items) for m in got) == 25)
    items = [i for m in got for i in decode(Feedback, m).items]
    assert [i.request_id for i in items] == [f"r{i}" for i in range(25)]
    assert all(i.model == man.ref for i in items)


def test_local_http_feedback_route(bench):
    from agent.localapi import InferenceClient
    from agent.v2 import V2Error

    got = _collect(bench, "dev4", "feedback")
    a = bench.agent("dev4", api_port=free_port())
    tp, man, _w, _b = bench.bundle()
    bench.deploy("dev4", "d1", tp, man.ref)
    assert bench.wait_for(a, "d1") == "installed"
    client = InferenceClient(f"http://127.0.0.1:{a.api.port}")
    try:
        client.feedback("lin", 2, 1, request_id="req-1", score={"1": 0.6, "2": 0.4})
        client.feedback(f"lin/versions/{man.version}", 0, 0, request_id="req-2")
        for model, label, pred, match in [
            ("lin", True, 1, "boolean"),
            ("lin", 1, "x", "same type"),
            ("other", 1, 1, "not served"),
            ("lin", "x" * 200, "y", "label: .*1-128 characters"),
        ]:
            with pytest.raises(V2Error, match=match) as e:
                client.feedback(model, label, pred)
            assert e.value.status == 400 or match == "not served"
        with pytest.raises(V2Error, match="1-1000 labels"):
            client.feedback("lin", 1, 1, score={})
        for body in (b'{"label": ' + b"9" * 5000 + b', "prediction": 1}', b"[" * 100_000):
            with pytest.raises(V2Error, match="not JSON") as e:
                client._request("POST", "/v2/models/lin/feedback", body, {"Content-Type": "application/json"})
            assert e.value.status == 400
        with pytest.raises(V2Error, match="unknown feedback fields"):
            client._call("POST", "/v2/models/lin/feedback", {"label": 1, "prediction": 1, "extra": 1})
        with pytest.raises(V2Error, match="not JSON"):
            client._request("POST", "/v2/models/lin/feedback", b"{truncated", {"Content-Type": "application/json"})
    finally:
        client.close()
    _until(lambda: sum(len(decode(Feedback, m).items) for m in got) == 2)
    items = [i for m in got for i in decode(Feedback, m).items]
    assert [(i.request_id, i.label, i.prediction, i.model) for i in items] == [
        ("req-1", 2, 1, man.ref), ("req-2", 0, 0, man.ref)]


def test_feedback_is_split_into_messages_the_hub_takes():
    """1,000 labels with 25-class score maps encode to about 320 KB, over the 256 KiB a
    payload may be: the whole batch was refused at the hub."""
    from agent.daemon import _feedback_parts
    from agent.protocol import MAX_JSON_PAYLOAD, LabelRecord, encode

    score = {f"class-{k:02d}": 0.04 for k in range(25)}
    labels = [LabelRecord(model="m:1.0.0", request_id=f"r{i}", ts=1.0, label=i % 25, prediction=0, score=score)
              for i in range(2500)]
    parts = _feedback_parts(labels)
    assert [x for p in parts for x in p] == labels  # all of them, in order
    assert len(parts) > 3 and all(1 <= len(p) <= 1000 for p in parts)
    for p in parts:
        data = encode(Feedback(seq=2**63 - 1, items=p))
        assert len(data) <= MAX_JSON_PAYLOAD and len(decode(Feedback, data).items) == len(p)
    assert _feedback_parts([]) == [] and _feedback_parts(labels[:3]) == [labels[:3]]
