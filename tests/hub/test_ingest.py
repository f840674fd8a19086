"""Device messages over a real Mosquitto reach the database; malformed ones are counted."""

from __future__ import annotations

import json
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from agent import protocol
from agent.errors import PayloadError
from hub.models import Telemetry
from hub.mqtt_ingest import INGEST_CLIENTS_ENV
from tests.hub.bundles import make_bundle
from tests.hub.conftest import HubHarness, SimDevice, wait_until

DeviceFactory = Callable[..., SimDevice]


def _device(h: HubHarness, device_id: str) -> dict:  # type: ignore[type-arg]
    r = h.client.get(f"/api/v1/devices/{device_id}")
    return r.json() if r.status_code == 200 else {}


def _telemetry(seq: int, **kw: object) -> protocol.Telemetry:
    now = time.time()
    return protocol.Telemetry(
        seq=seq, window_start=now - 10, window_end=now, model="tiny:1.0.0",
        inference_count=100 + seq, error_count=1,
        latency=protocol.LatencyStats(p50_ms=1.5, p95_ms=4.0), rss_bytes=123456, **kw,  # type: ignore[arg-type]
    )


def test_hello_presence_status_telemetry(hub: HubHarness, device_factory: DeviceFactory, session_mosquitto) -> None:  # type: ignore[no-untyped-def]
    dev = device_factory(session_mosquitto.url)
    dev.hello(model="tiny:1.0.0", tags=["lab", "floor-2"])
    d = wait_until(lambda: _device(hub, dev.device_id).get("profile") and _device(hub, dev.device_id))
    assert d["online"] is True and d["profile"] == "x86-gateway-vnni"
    assert d["model"] == "tiny:1.0.0" and d["tags"] == ["lab", "floor-2"]
    assert d["runtimes"] == {"onnxruntime": "1.32.0"} and d["last_seen"]

    dev.publish("status", protocol.StatusReport(seq=5, state="installed", outcome="installed",
                                                model="tiny:2.0.0", previous_model="tiny:1.0.0",
                                                conditions=["metadata_expired"]))
    # Older and duplicate reports are ignored.
    dev.publish("status", protocol.StatusReport(seq=4, state="downloading", outcome="in_progress"))
    dev.publish("status", protocol.StatusReport(seq=5, state="failed", outcome="failed"))
    for seq in (1, 2, 2, 3):  # one duplicate window
        dev.publish("telemetry", _telemetry(seq))
    time.sleep(0.3)
    hub.settle()
    d = _device(hub, dev.device_id)
    assert (d["state"], d["model"], d["previous_model"]) == ("installed", "tiny:2.0.0", "tiny:1.0.0")
    assert d["conditions"] == ["metadata_expired"]

    rows = hub.client.get("/api/v1/telemetry", params={"device_id": dev.device_id}).json()
    assert [r["seq"] for r in rows] == [3, 2, 1]
    assert rows[0]["inference_count"] == 103 and rows[0]["p95_ms"] == 4.0 and rows[0]["rss_bytes"] == 123456
    assert rows[0]["payload"]["latency"]["p50_ms"] == 1.5

    # Last will: the broker marks the device offline when it vanishes.
    dev.client._sock.close()  # type: ignore[union-attr]  # drop the TCP connection without DISCONNECT
    wait_until(lambda: _device(hub, dev.device_id).get("online") is False, timeout=15)


def test_telemetry_before_hello_creates_device(hub: HubHarness, device_factory: DeviceFactory, session_mosquitto) -> None:  # type: ignore[no-untyped-def]
    dev = device_factory(session_mosquitto.url)
    dev.publish("telemetry", _telemetry(1))
    wait_until(lambda: _device(hub, dev.device_id))
    d = _device(hub, dev.device_id)
    assert d["profile"] is None and d["last_seen"]


def test_malformed_payloads_are_counted_and_harmless(
    hub: HubHarness, device_factory: DeviceFactory, session_mosquitto  # type: ignore[no-untyped-def]
) -> None:
    dev = device_factory(session_mosquitto.url)
    good = protocol.encode(_telemetry(1))
    bad = {
        "not_json": b"\xff\xfe not json",
        "truncated": good[: len(good) // 2],
        "oversized": b'{"v": 1, "pad": "' + b"x" * (protocol.MAX_JSON_PAYLOAD + 10) + b'"}',
        "version": json.dumps({**json.loads(good), "v": 99}).encode(),
        "schema": json.dumps({"v": 1, "seq": -1}).encode(),
        # Over a signed 64-bit column: SQLite's driver raised OverflowError, which stopped
        # the ingest thread for every device.
        "seq over 64 bits": json.dumps({**json.loads(good), "seq": 2**63}).encode(),
        # Python's json raises RecursionError and a bare ValueError for these; they lost the
        # whole batch of other devices' messages around them.
        "nested too deep": b'{"v": 1, "seq": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        "5,000-digit integer": b'{"v": 1, "seq": ' + b"9" * 5000 + b"}",
    }
    for payload in bad.values():
        dev.publish("telemetry", payload)
    dev.publish("status", b"[1, 2, 3]")
    dev.publish("status", json.dumps({"v": 1, "seq": 1, "seq_epoch": 2**64, "state": "idle",
                                      "outcome": "idle"}).encode())
    other = protocol.Hello(device_id="someone-else", profile="p", agent_version="1", runtimes={})
    dev.publish("hello", other)
    dev.publish("repo/get", b"{nope")
    dev.publish("telemetry", good)  # still works afterwards
    time.sleep(0.3)
    hub.settle()
    wait_until(lambda: hub.client.get("/api/v1/stats/payload-errors").json()["total"] >= 12)
    stats = hub.client.get("/api/v1/stats/payload-errors").json()
    # Truncated JSON is "not_json" too; the status list is "schema" (not an object).
    assert stats["by_kind"] == {"not_json": 5, "oversized": 1, "version": 1, "schema": 4, "device_mismatch": 1}
    assert stats["by_topic"]["telemetry"]["not_json"] == 4
    assert stats["by_topic"]["hello"] == {"device_mismatch": 1}
    assert stats["by_topic"]["repo/get"] == {"not_json": 1}
    assert [r["seq"] for r in hub.client.get("/api/v1/telemetry", params={"device_id": dev.device_id}).json()] == [1]
    assert hub.client.get("/healthz").json()["status"] == "ok"


def test_repo_get_serves_chunk_frames(
    hub: HubHarness, device_factory: DeviceFactory, session_mosquitto, tmp_path: Path  # type: ignore[no-untyped-def]
) -> None:
    bundle = make_bundle(tmp_path)
    b = hub.client.post("/api/v1/models", files={"bundle": (bundle.name, bundle.read_bytes())}).json()["bundle"]
    dev = device_factory(session_mosquitto.url)
    dev.subscribe("repo/data")
    raw = bundle.read_bytes()
    requests = [
        protocol.RepoRequest(rid="a", path=f"targets/{b['target_path']}", offset=0, length=4096),
        protocol.RepoRequest(rid="b", path=f"targets/{b['target_path']}", offset=4096, length=1 << 20),
        protocol.RepoRequest(rid="c", path="metadata/timestamp.json", length=65536),
        protocol.RepoRequest(rid="d", path=f"targets/{'0' * 64}.efb", length=10),
        protocol.RepoRequest(rid="e", path="../hub.db", length=10),
    ]
    for req in requests:
        dev.publish("repo/get", req)
    msgs = dev.wait_for("repo/data", count=len(requests))
    frames = {h.rid: (h, data) for h, data in (protocol.decode_frame(m.payload) for m in msgs)}
    ha, da = frames["a"]
    hb, db = frames["b"]
    assert (ha.status, ha.total, ha.offset) == ("ok", len(raw), 0)
    assert da + db == raw and hb.offset == 4096
    assert frames["c"][0].status == "ok"
    assert frames["c"][1] == (hub.hub.repository.metadata_dir / "timestamp.json").read_bytes()
    assert frames["d"][0].status == "not_found"
    assert frames["e"][0].status == "error" and frames["e"][0].error


_EXACT = protocol.encode(_telemetry(1))
_DOC = json.loads(_EXACT)


@pytest.mark.parametrize(
    ("payload", "kept"),
    [
        (_EXACT, True),  # what agents send: stored as received
        (json.dumps({**_DOC, "future_field": 1}).encode(), False),  # unknown field: re-serialised without it
        (json.dumps({**_DOC, "latency": {**_DOC["latency"], "pad": "x" * 8000}}).encode(), False),  # too long
        (json.dumps({**_DOC, "cpu_percent": "5"}).encode(), False),  # lax: pydantic converts, so re-serialised
        (json.dumps({**_DOC, "seq": 1.0}).encode(), False),
        (json.dumps({k: v for k, v in _DOC.items() if k != "dropped_records"}).encode(), False),  # default filled
        (json.dumps({**_DOC, "ts": float("nan")}).encode(), False),  # NaN: not JSON for PostgreSQL
        (json.dumps({**_DOC, "ts": float("inf")}).encode(), False),
    ],
)
def test_telemetry_text_is_kept_only_when_it_is_the_validated_document(payload: bytes, kept: bool) -> None:
    from hub.mqtt_ingest import _telemetry_as_received

    got = _telemetry_as_received(payload)
    if kept:
        assert got is not None and got[1] == payload.decode()
    else:
        # Either validated (strictly) but re-serialised, or left to protocol.decode.
        assert got is None or got[1] is None


@pytest.mark.parametrize("payload", [
    b"\xff\xfe not json", _EXACT[:40], b"[1]", json.dumps({**_DOC, "v": 2}).encode(),
    json.dumps({**_DOC, "seq": -1}).encode(), b" " * (protocol.MAX_JSON_PAYLOAD + 1),
])
def test_malformed_telemetry_is_left_to_protocol_decode(payload: bytes) -> None:
    from hub.mqtt_ingest import _telemetry_as_received

    assert _telemetry_as_received(payload) is None
    with pytest.raises(PayloadError):
        protocol.decode(protocol.Telemetry, payload)


def test_stored_telemetry_payloads(hub: HubHarness, device_factory: DeviceFactory, session_mosquitto) -> None:  # type: ignore[no-untyped-def]
    """As received when that is the validated document, else the model re-serialised:
    unknown fields dropped, values pydantic converted, defaults filled in, NaN written as
    null (PostgreSQL's JSON type rejects NaN)."""
    dev = device_factory(session_mosquitto.url)
    doc = json.loads(protocol.encode(_telemetry(1)))
    dev.publish("telemetry", json.dumps({**doc, "future_field": [1, 2]}).encode())
    dev.publish("telemetry", json.dumps({**doc, "seq": 2, "cpu_percent": "5"}).encode())
    dev.publish("telemetry", json.dumps({k: v for k, v in {**doc, "seq": 3}.items() if k != "latency"}).encode())
    dev.publish("telemetry", json.dumps({**doc, "seq": 4, "ts": float("nan")}).encode())
    time.sleep(0.3)
    hub.settle()
    rows = {r["seq"]: r for r in hub.client.get("/api/v1/telemetry", params={"device_id": dev.device_id}).json()}
    assert sorted(rows) == [1, 2, 3, 4]
    assert rows[1]["payload"] == doc  # the unknown field is not stored
    assert rows[2]["payload"]["cpu_percent"] == 5.0
    assert rows[3]["payload"]["latency"] == {"p50_ms": None, "p95_ms": None, "max_ms": None}
    assert rows[3]["p50_ms"] is None
    assert rows[4]["payload"]["ts"] is None and rows[4]["payload"]["seq"] == 4
    assert rows[1]["inference_count"] == 101 and rows[1]["received"]
    assert hub.client.get("/api/v1/stats/payload-errors").json()["total"] == 0


def test_ingest_batches_many_telemetry_messages(
    hub: HubHarness, device_factory: DeviceFactory, session_mosquitto  # type: ignore[no-untyped-def]
) -> None:
    devs = [device_factory(session_mosquitto.url, f"bulk-{uuid.uuid4().hex[:8]}") for _ in range(5)]
    for seq in range(200):
        for d in devs:
            d.client.publish(d_topic(d), protocol.encode(_telemetry(seq)), qos=1)
    ids = {d.device_id for d in devs}

    def stored() -> int:
        with hub.hub.db.session() as s:
            return sum(1 for t in s.query(Telemetry).all() if t.device_id in ids)  # type: ignore[attr-defined]

    wait_until(lambda: stored() == 1000, timeout=30)


def d_topic(d: SimDevice) -> str:
    from agent import topics

    return topics.device_topic(d.device_id, "telemetry")


# --------------------------------------------------------------------------- several ingest clients


def _stored(h: HubHarness, ids: set[str]) -> dict[str, list[int]]:
    with h.hub.db.session() as s:
        out: dict[str, list[int]] = {}
        for t in s.query(Telemetry).all():  # type: ignore[attr-defined]
            if t.device_id in ids:
                out.setdefault(t.device_id, []).append(t.seq)
    return {d: sorted(v) for d, v in out.items()}


@pytest.fixture
def shared_hub(hub_factory, db_url: str, session_mosquitto, monkeypatch: pytest.MonkeyPatch) -> HubHarness:  # type: ignore[no-untyped-def]
    """A hub with three ingest clients sharing the telemetry subscription."""
    monkeypatch.setenv(INGEST_CLIENTS_ENV, "3")
    return hub_factory(db_url, session_mosquitto.url)  # type: ignore[no-any-return]


def test_shared_subscription_splits_telemetry_and_stores_each_window_once(
    shared_hub: HubHarness, device_factory: DeviceFactory, session_mosquitto  # type: ignore[no-untyped-def]
) -> None:
    from hub.mqtt_ingest import share_group

    hub = shared_hub
    ingest = hub.hub.mqtt
    assert ingest.ingest_clients > 1
    wait_until(ingest.shared.is_set)
    assert ingest.share_group == share_group(hub.hub.db.url)
    devs = [device_factory(session_mosquitto.url, f"shared-{uuid.uuid4().hex[:8]}") for _ in range(4)]
    time.sleep(0.5)  # every ingest client has joined the group
    before = Counter(ingest.received_by_client)
    for seq in range(150):
        for d in devs:
            d.client.publish(d_topic(d), protocol.encode(_telemetry(seq)), qos=1)
    for d in devs:  # redelivered windows, possibly to another client of the group
        for seq in range(0, 150, 10):
            d.client.publish(d_topic(d), protocol.encode(_telemetry(seq)), qos=1)
    ids = {d.device_id for d in devs}
    wait_until(lambda: sum(map(len, _stored(hub, ids).values())) >= 600, timeout=30)
    time.sleep(0.3)
    hub.settle()
    assert _stored(hub, ids) == {d: list(range(150)) for d in ids}
    got = Counter(ingest.received_by_client)
    got.subtract(before)
    assert sum(got.values()) == 600 + 4 * 15  # each message reached exactly one client
    assert sum(1 for n in got.values() if n > 0) > 1, got  # and the work was split


def test_a_device_with_a_new_spool_is_heard_again_though_its_clock_is_behind(  # type: ignore[no-untyped-def]
    hub: HubHarness, device_factory: DeviceFactory, session_mosquitto
) -> None:
    """A re-flashed board without a real-time clock counts from its (early) clock in a new
    spool: its reports are below the last the hub stored, in another ``seq_epoch``."""
    dev = device_factory(session_mosquitto.url)
    dev.hello(model="tiny:1.0.0")
    wait_until(lambda: _device(hub, dev.device_id).get("profile"))
    dev.publish("status", protocol.StatusReport(seq=1_800_000_000_000, seq_epoch=7, state="committed",
                                                outcome="installed", model="tiny:1.0.0"))
    hub.settle()
    assert wait_until(lambda: _device(hub, dev.device_id)["state"] == "committed")
    # The new spool: seq from a clock years behind.
    dev.publish("status", protocol.StatusReport(seq=1_600_000_000_000, seq_epoch=8, state="idle",
                                                outcome="idle", model=None))
    # Within the new counter, order holds again; a report without an epoch (an older
    # agent) is compared as before.
    dev.publish("status", protocol.StatusReport(seq=1_599_999_999_999, seq_epoch=8, state="failed",
                                                outcome="failed"))
    dev.publish("status", protocol.StatusReport(seq=1_500_000_000_000, state="failed", outcome="failed"))
    time.sleep(0.3)
    hub.settle()
    d = _device(hub, dev.device_id)
    assert (d["state"], d["model"]) == ("idle", None)


def test_a_restarted_hub_keeps_the_model_a_later_status_reported(  # type: ignore[no-untyped-def]
    hub_factory, db_url, session_mosquitto, device_factory
) -> None:
    """The agent publishes its (retained) hello on connect only; after an update its
    status says the new model. A starting hub gets both retained messages again: the
    old hello must not take the device back to its old model (a rollback would then be
    signed for the wrong version)."""
    first = hub_factory(db_url, session_mosquitto.url)
    dev = device_factory(session_mosquitto.url)
    dev.hello(model="tiny:1.0.0")
    wait_until(lambda: _device(first, dev.device_id).get("model") == "tiny:1.0.0")
    dev.publish("status", protocol.StatusReport(seq=7, state="committed", outcome="installed",
                                                model="tiny:2.0.0", previous_model="tiny:1.0.0"))
    wait_until(lambda: _device(first, dev.device_id).get("model") == "tiny:2.0.0")
    first.client.__exit__(None, None, None)
    again = hub_factory(db_url, session_mosquitto.url)
    time.sleep(1.0)  # the retained hello and status are delivered on subscribe
    again.settle()
    d = _device(again, dev.device_id)
    assert (d["model"], d["previous_model"]) == ("tiny:2.0.0", "tiny:1.0.0")
    # A live hello (the device reconnects) is taken as before.
    dev.hello(model="tiny:2.0.0", tags=["moved"])
    wait_until(lambda: _device(again, dev.device_id).get("tags") == ["moved"])


def test_order_sensitive_messages_stay_on_one_client(
    shared_hub: HubHarness, device_factory: DeviceFactory, session_mosquitto  # type: ignore[no-untyped-def]
) -> None:
    """Presence has no sequence number: it must be applied in the order it was sent."""
    hub = shared_hub
    ingest = hub.hub.mqtt
    wait_until(ingest.shared.is_set)
    dev = device_factory(session_mosquitto.url)
    dev.hello(model="tiny:1.0.0")
    for i in range(60):
        dev.publish("presence", protocol.Presence(online=i % 2 == 1))
        dev.publish("telemetry", _telemetry(i))
    time.sleep(0.3)
    hub.settle()
    wait_until(lambda: len(_stored(hub, {dev.device_id}).get(dev.device_id, [])) == 60)
    assert _device(hub, dev.device_id)["online"] is True  # the last presence sent
    extra = [c for c in ingest.received_by_client if c != ingest.client_id]
    assert extra  # telemetry was shared ...
    # ... and only the primary client subscribes to the ordered kinds.
    assert ingest.received["presence"] >= 60


def test_two_hubs_on_different_databases_each_get_all_telemetry(
    hub_factory, device_factory: DeviceFactory, session_mosquitto, tmp_path: Path,  # type: ignore[no-untyped-def]
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(INGEST_CLIENTS_ENV, "3")
    a = hub_factory(f"sqlite:///{tmp_path / 'a.db'}", session_mosquitto.url)
    b = hub_factory(f"sqlite:///{tmp_path / 'b.db'}", session_mosquitto.url)
    assert a.hub.mqtt.share_group != b.hub.mqtt.share_group
    wait_until(lambda: a.hub.mqtt.shared.is_set() and b.hub.mqtt.shared.is_set())
    time.sleep(0.5)
    dev = device_factory(session_mosquitto.url)
    for seq in range(100):
        dev.client.publish(d_topic(dev), protocol.encode(_telemetry(seq)), qos=1)
    for h in (a, b):
        wait_until(lambda h=h: len(_stored(h, {dev.device_id}).get(dev.device_id, [])) == 100, timeout=20)


def test_broker_without_shared_subscriptions_keeps_one_client(
    hub_factory, device_factory: DeviceFactory, embedded_broker, tmp_path: Path,  # type: ignore[no-untyped-def]
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The embedded amqtt broker ignores $share filters: the hub must notice and keep
    telemetry on its plain subscription rather than lose it."""
    monkeypatch.setenv(INGEST_CLIENTS_ENV, "3")
    h = hub_factory(f"sqlite:///{tmp_path / 'e.db'}", embedded_broker.url)
    dev = device_factory(embedded_broker.url)
    for seq in range(50):
        dev.client.publish(d_topic(dev), protocol.encode(_telemetry(seq)), qos=1)
    wait_until(lambda: len(_stored(h, {dev.device_id}).get(dev.device_id, [])) == 50, timeout=20)
    assert not h.hub.mqtt.shared.is_set()
    assert list(h.hub.mqtt.received_by_client) == [h.hub.mqtt.client_id]


def test_fast_decode_agrees_with_protocol_decode() -> None:
    from agent.errors import PayloadError
    from hub.mqtt_ingest import _fast_decode

    good = json.loads(protocol.encode(_telemetry(7)))
    cases = [
        json.dumps(good).encode(),
        json.dumps({k: v for k, v in good.items() if k != "v"}).encode(),  # no version: refused
        json.dumps({**good, "v": 2}).encode(),
        json.dumps({**good, "seq": -1}).encode(),
        json.dumps({**good, "extra": {"v": 1}}).encode(),
        json.dumps([good]).encode(),
        b"\xff\xfe not json",
        b'{"v": 1, "pad": "' + b"x" * (protocol.MAX_JSON_PAYLOAD + 10) + b'"}',
    ]
    for data in cases:
        fast = _fast_decode(protocol.Telemetry, data)
        try:
            slow: object = protocol.decode(protocol.Telemetry, data)
        except PayloadError:
            slow = None
        if fast is not None:
            assert fast == slow, data[:80]
    assert _fast_decode(protocol.Telemetry, cases[0]) is not None


# --------------------------------------------------------------------------- the hub's paho client


def test_buffered_client_acknowledges_each_read_with_one_write(session_mosquitto) -> None:  # type: ignore[no-untyped-def]
    """Every QoS 1 message is acknowledged (3,000 is more than the broker sends before
    it has PUBACKs back: max_inflight_messages 1000), in far fewer socket writes than
    messages: the PUBACKs of one socket read go out together."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    from agent import topics
    from hub.mqtt_ingest import _BufferedClient

    writes: list[bytes] = []

    class Counting(_BufferedClient):
        def _sock_send(self, buf: bytes) -> int:
            writes.append(bytes(buf))
            return super()._sock_send(buf)  # type: ignore[no-any-return]

    got: list[bytes] = []
    sub = Counting(CallbackAPIVersion.VERSION2, client_id=f"buffered-{uuid.uuid4().hex[:8]}",
                   clean_session=False, protocol=mqtt.MQTTv311)
    sub.max_inflight_messages_set(1000)
    sub.on_message = lambda _c, _u, m: got.append(m.payload)
    topic = topics.device_topic(f"acks-{uuid.uuid4().hex[:8]}", "telemetry")
    sub.connect("127.0.0.1", session_mosquitto.port)
    sub.subscribe(topic, 1)
    for _ in range(20):  # CONNACK and SUBACK, without the network thread yet
        sub.loop(0.05)
    pub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"pub-{uuid.uuid4().hex[:8]}")
    pub.max_inflight_messages_set(1000)
    pub.connect("127.0.0.1", session_mosquitto.port)
    pub.loop_start()
    try:
        infos = [pub.publish(topic, b"%d" % i, qos=1) for i in range(3000)]
        for info in infos:
            info.wait_for_publish(10)
        writes.clear()
        sub.loop_start()  # the broker has a window's worth queued for us: large reads
        wait_until(lambda: len(got) == 3000, timeout=30)
        assert got == [b"%d" % i for i in range(3000)]
        time.sleep(0.3)
        pubacks = b"".join(w for w in writes if w[:1] == b"\x40")
        assert len(pubacks) == 4 * 3000  # each message acknowledged once...
        assert len(writes) < 3000 / 10  # ...in a few writes
    finally:
        pub.loop_stop()
        pub.disconnect()
        sub.loop_stop()
        sub.disconnect()
