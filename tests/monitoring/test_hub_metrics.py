"""End to end over real MQTT: devices publish telemetry and drift sketches to
Mosquitto, the hub ingests them, the background loop raises alerts by itself, and
/api/v1/operations and /metrics (strictly parsed Prometheus text) report them."""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent import protocol
from agent.bundle import Reference
from agent.sketch import LATENCY_EDGES_MS, DriftSketch
from hub import drift
from hub.monitoring import MonitoringSettings
from tests.hub.conftest import SimDevice, wait_until
from tests.monitoring.hub_support import MonHub, device_sketch, make_ref_bundle, start_hub

MODEL = "clf:1.0.0"

_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_SAMPLE = re.compile(rf"^({_NAME})(?:\{{((?:[a-zA-Z_][a-zA-Z0-9_]*=\"(?:[^\"\\\n]|\\.)*\",?)*)\}})? (\S+)$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\.)*)"')

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse_prometheus(text: str) -> Samples:
    """Strict reader of the text format 0.0.4: HELP and TYPE before a family's samples,
    valid names, quoted and escaped label values, float values, no duplicates."""
    assert text.endswith("\n")
    types: dict[str, str] = {}
    out: Samples = {}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            assert re.match(rf"^# HELP {_NAME} \S", line), line
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert kind in ("counter", "gauge", "histogram", "summary", "untyped") and name not in types, line
            types[name] = kind
            continue
        m = _SAMPLE.match(line)
        assert m, f"not a sample line: {line!r}"
        name, labels, value = m.groups()
        assert name in types, f"{name} has no TYPE"
        if types[name] == "counter":
            assert name.endswith("_total"), name
        key = (name, frozenset(_LABEL.findall(labels or "")))
        assert key not in out, f"duplicate sample {line!r}"
        v = float(value)
        assert not math.isnan(v)
        out[key] = v
    return out


def _get(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


@pytest.fixture
def mon(tmp_path: Path, session_mosquitto: Any) -> Iterator[MonHub]:
    stack: list[Any] = []
    h = start_hub(tmp_path, f"sqlite:///{tmp_path / 'hub.db'}", session_mosquitto.url,
                  MonitoringSettings(interval_s=0.3, ops_window_s=3600), stack)
    yield h
    for c in reversed(stack):
        c.__exit__(None, None, None)


def test_mqtt_to_alerts_operations_and_metrics(
    mon: MonHub, reference: Reference, rng: np.random.Generator, tmp_path: Path,
    device_factory: Callable[..., SimDevice],
) -> None:
    with open(make_ref_bundle(tmp_path, reference), "rb") as fh:
        assert mon.client.post("/api/v1/models", files={"bundle": ("b.efb", fh)}).status_code == 201
    broker = mon.hub.broker_url
    now = time.time()
    devices = [device_factory(broker) for _ in range(3)]
    sent: list[DriftSketch] = []
    for i, d in enumerate(devices):
        d.hello(model=MODEL, tags=["line-1"])
        d.publish("presence", protocol.Presence(online=True))
        for k in range(2):
            t0 = now - 1200 + k * 600
            sk = device_sketch(reference, MODEL, rng, t0, t0 + 600, rows=500, shift=2.0, latency_ms=3.0 + i)
            sent.append(sk)
            d.publish("drift", sk.encode())
            d.publish("telemetry", protocol.Telemetry(
                seq=k, window_start=t0, window_end=t0 + 600, model=MODEL, inference_count=500,
                error_count=5 * i, latency=protocol.LatencyStats(p50_ms=3.0, p95_ms=9.0),
                cpu_percent=10.0 * (i + 1), rss_bytes=(100 + i) << 20))
    devices[0].publish("drift", b'{"v": 1, "model": "clf:1.0.0", "rows": -1}')
    devices[0].publish("drift", b"\x00not json")
    wait_until(lambda: mon.hub.mqtt.received["drift"] >= 8 and mon.hub.mqtt.received["telemetry"] >= 6)
    assert mon.hub.mqtt.wait_idle(10)

    body = mon.client.get("/api/v1/drift/clf/1.0.0").json()
    assert body["devices"] == 3 and body["sketches"] == 6 and body["rejected"] == {}
    merged = drift.merge(sent, reference=reference)
    want = drift.drift_report(reference, merged)
    assert [f["psi"] for f in body["features"]] == [r.psi for r in want if r.role == "input"]
    assert body["status"] == "alert"

    # The background loop (every 0.3 s) opens the alerts without being asked.
    alerts = wait_until(lambda: mon.client.get("/api/v1/alerts", params={"state": "open"}).json())
    assert {"x0", "prediction"} <= {a["subject"] for a in alerts}

    ops = mon.client.get("/api/v1/operations", params={"window": "1h"}).json()
    assert ops["fleet"]["requests"] == 3000 and ops["fleet"]["errors"] == 2 * (0 + 5 + 10)
    assert ops["fleet"]["throughput_rps"] == pytest.approx(3 * 500 / 600)
    assert ops["fleet"]["latency_source"] == "sketch"
    assert ops["fleet"]["p95_ms"] == pytest.approx(
        drift.histogram_quantile(LATENCY_EDGES_MS, merged.latency_ms, 0.95))
    assert ops["fleet"]["cpu_percent"] == pytest.approx(20.0) and ops["fleet"]["rss_bytes"] == 102 << 20
    per_dev = {d["key"]: d for d in ops["devices"]}
    assert per_dev[devices[2].device_id]["error_rate"] == pytest.approx(10 / 500)
    (model_ops,) = ops["models"]
    one = mon.client.get("/api/v1/operations", params={"select": f"id={devices[1].device_id}",
                                                      "window": "1h"}).json()
    assert [d["key"] for d in one["devices"]] == [devices[1].device_id] and one["fleet"]["requests"] == 1000

    r = mon.client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4")
    m = parse_prometheus(r.text)
    assert _get(m, "edgefleet_devices", state="online") == 3
    assert _get(m, "edgefleet_mqtt_messages_received_total", kind="drift") == 8
    assert _get(m, "edgefleet_mqtt_messages_received_total", kind="telemetry") == 6
    assert _get(m, "edgefleet_telemetry_windows") == 6 and _get(m, "edgefleet_drift_sketches") == 6
    drift_errors = sum(v for (n, lab), v in m.items()
                       if n == "edgefleet_payload_errors_total" and ("topic", "drift") in lab)
    assert drift_errors == 2
    assert _get(m, "edgefleet_model_inference_rate", model=MODEL) == pytest.approx(model_ops["throughput_rps"])
    assert _get(m, "edgefleet_model_error_ratio", model=MODEL) == pytest.approx(30 / 3000)
    assert _get(m, "edgefleet_model_latency_ms", model=MODEL, quantile="0.5") == pytest.approx(model_ops["p50_ms"])
    assert (_get(m, "edgefleet_alerts_open", kind="drift", severity="critical") or 0) >= 2
    assert (_get(m, "edgefleet_monitor_evaluations_total") or 0) >= 1


def test_metrics_parser_rejects_bad_text() -> None:
    for bad in ("x 1\n", "# TYPE x gauge\nx{a=b} 1\n", "# TYPE x_total counter\n# TYPE x_total counter\n",
                "# TYPE x counter\nx 1\n", "# TYPE x gauge\nx 1\nx 2\n", "# TYPE x gauge\nx one\n"):
        with pytest.raises((AssertionError, ValueError)):
            parse_prometheus(bad)
