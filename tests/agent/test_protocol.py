"""Every inbound payload parser: malformed, truncated, oversized, wrong version."""

from __future__ import annotations

import pytest

from agent import topics
from agent.errors import PayloadError
from agent.protocol import (
    MAX_JSON_PAYLOAD,
    ChunkHeader,
    Deployment,
    StatusReport,
    decode,
    decode_frame,
    encode,
    encode_frame,
)

GOOD = encode(Deployment(deployment_id="d1", model="m:1.0.0", target_path="x.efb"))


@pytest.mark.parametrize(
    "payload,kind",
    [
        (b"not json", "not_json"),
        (GOOD[: len(GOOD) // 2], "not_json"),
        (b"\xff\xfe", "not_json"),
        (b"[1,2]", "schema"),
        (b'{"deployment_id":"d"}', "version"),
        (GOOD.replace(b'"v":1', b'"v":99'), "version"),
        (b'{"v":1,"deployment_id":"d"}', "schema"),
        (b'{"v":1,"deployment_id":"","model":"m","target_path":"t"}', "schema"),
        (b" " * (MAX_JSON_PAYLOAD + 1), "oversized"),
        # A target path is one file name: never a path out of the downloads folder.
        (GOOD.replace(b'"x.efb"', b'"../../etc/passwd"'), "schema"),
        (GOOD.replace(b'"x.efb"', b'"/etc/passwd"'), "schema"),
        (GOOD.replace(b'"x.efb"', b'"x\\u0000.efb"'), "schema"),
        (GOOD.replace(b'"x.efb"', b'".efb"'), "schema"),
    ],
)
def test_bad_json_payloads(payload: bytes, kind: str):
    with pytest.raises(PayloadError) as ei:
        decode(Deployment, payload)
    assert ei.value.kind == kind
    assert "Deployment" in str(ei.value)


def test_roundtrip_and_unknown_fields_ignored():
    d = decode(Deployment, GOOD.replace(b"{", b'{"future_field":1,', 1))
    assert d.deployment_id == "d1"
    with pytest.raises(PayloadError):
        decode(StatusReport, encode(StatusReport(seq=1, state="idle", outcome="idle")).replace(b'"seq":1', b'"seq":-1'))


def test_frames():
    frame = encode_frame(ChunkHeader(rid="r", path="p", total=3), b"abc")
    h, data = decode_frame(frame)
    assert data == b"abc" and h.total == 3
    with pytest.raises(PayloadError, match="sha256"):
        decode_frame(frame[:-1] + b"x")
    with pytest.raises(PayloadError):
        decode_frame(frame[:6])
    with pytest.raises(PayloadError):
        decode_frame(b"XXXX" + frame[4:])
    with pytest.raises(PayloadError, match="exceed"):
        decode_frame(encode_frame(ChunkHeader(rid="r", path="p"), b"x" * 100), limit=10)
    with pytest.raises(PayloadError, match="header length"):
        decode_frame(frame[:4] + (10**6).to_bytes(4, "big") + frame[8:])


def test_topics():
    t = topics.device_topic("dev-1", "repo/get")
    assert topics.parse_device_topic(t) == topics.DeviceTopic("dev-1", "repo/get")
    assert topics.parse_device_topic("edgefleet/v1/devices/a+b/status") is None
    assert topics.parse_device_topic("other/x") is None
    with pytest.raises(ValueError):
        topics.device_topic("a/b", "status")
    with pytest.raises(ValueError):
        topics.device_topic("#", "status")
