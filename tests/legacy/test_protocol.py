"""The wire decoders on this stack: JSON payloads, chunk frames, drift sketches."""

from __future__ import annotations

import numpy as np
import pytest

from agent.errors import PayloadError
from agent.features import build_reference
from agent.protocol import (
    ChunkHeader,
    Deployment,
    StatusReport,
    decode,
    decode_frame,
    encode,
    encode_frame,
)
from agent.sketch import DriftSketch, SketchAccumulator

GOOD = encode(Deployment(deployment_id="d1", model="m:1.0.0", target_path="x.efb"))


@pytest.mark.parametrize("payload,kind", [
    (b"not json", "not_json"),
    (GOOD[: len(GOOD) // 2], "not_json"),
    (b"[1,2]", "schema"),
    (GOOD.replace(b'"v":1', b'"v":99'), "version"),
    (b'{"v":1,"deployment_id":"d"}', "schema"),
])
def test_bad_payloads_are_refused_by_kind(payload: bytes, kind: str):
    with pytest.raises(PayloadError) as ei:
        decode(Deployment, payload)
    assert ei.value.kind == kind


def test_payload_roundtrip():
    assert decode(Deployment, GOOD).deployment_id == "d1"
    rep = StatusReport(seq=3, state="committed", outcome="installed", model="m:1.0.0")
    assert decode(StatusReport, encode(rep)) == rep


def test_frames():
    frame = encode_frame(ChunkHeader(rid="r", path="p", total=3), b"abc")
    header, data = decode_frame(frame)
    assert data == b"abc" and header.total == 3
    with pytest.raises(PayloadError, match="sha256"):
        decode_frame(frame[:-1] + b"x")
    with pytest.raises(PayloadError, match="exceed"):
        decode_frame(encode_frame(ChunkHeader(rid="r", path="p"), b"x" * 100), limit=10)


def test_drift_sketch_roundtrip():
    """KLL sketches serialise identically across datasketches builds (numpy 1 and 2)."""
    rng = np.random.default_rng(0)
    ref_x = rng.normal(size=(500, 4)).astype(np.float32)
    ref = build_reference(ref_x, rng.integers(0, 3, 500), classes=["0", "1", "2"])
    acc = SketchAccumulator(ref, "lin:1.0.0")
    for _ in range(300):
        x = rng.normal(size=(1, 4)).astype(np.float32)
        acc.update(x, rng.normal(size=(1, 3)).astype(np.float32))
    sketch = acc.snapshot_and_reset(1.0e9)
    assert sketch.rows == 300
    again = DriftSketch.decode(sketch.encode())
    assert again.encode() == sketch.encode()
    with pytest.raises(PayloadError):
        DriftSketch.decode(sketch.encode()[:-10])
