"""The hub with no --broker: an embedded broker carries hello, deploy and repo/get."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from agent import protocol
from tests.hub.bundles import make_bundle
from tests.hub.conftest import HubHarness, SimDevice, wait_until


def test_hub_with_embedded_broker(
    hub_factory: Callable[..., HubHarness], device_factory: Callable[..., SimDevice], tmp_path: Path
) -> None:
    h = hub_factory(f"sqlite:///{tmp_path / 'hub.db'}", None)
    assert h.hub.broker is not None and h.client.get("/healthz").json()["status"] == "ok"
    bundle = make_bundle(tmp_path)
    b = h.client.post("/api/v1/models", files={"bundle": (bundle.name, bundle.read_bytes())}).json()["bundle"]

    dev = device_factory(h.hub.broker_url)
    dev.hello()
    wait_until(lambda: h.client.get(f"/api/v1/devices/{dev.device_id}").json().get("online"))
    dep = h.client.post("/api/v1/deployments", json={"model": "tiny:1.0.0", "devices": [dev.device_id]}).json()

    dev.subscribe("deploy")
    dev.subscribe("repo/data")
    d = protocol.decode(protocol.Deployment, dev.wait_for("deploy")[0].payload)
    assert d.deployment_id == dep["id"] and d.target_path == b["target_path"]
    dev.publish("repo/get", protocol.RepoRequest(rid="r1", path=f"targets/{d.target_path}", length=1 << 20))
    header, data = protocol.decode_frame(dev.wait_for("repo/data")[0].payload)
    assert header.status == "ok" and data == bundle.read_bytes()

    dev.publish("telemetry", protocol.Telemetry(seq=1, window_start=0, window_end=1, inference_count=3, error_count=0))
    wait_until(lambda: h.client.get("/api/v1/telemetry", params={"device_id": dev.device_id}).json())
