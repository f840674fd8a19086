"""Deployments: bundle choice per device, retained desired state, downgrade sign-off,
and status reports folded into per-device outcomes."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from agent import protocol, topics
from hub.deployments import choose_bundle, needs_downgrade
from hub.models import Bundle, Device
from tests.hub.bundles import make_bundle
from tests.hub.conftest import HubHarness, SimDevice, wait_until

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def _b(sha: str, profile: str = "p1", precision: str = "fp32", fmt: str = "onnx", selected: bool = False,
       age: int = 0, runtime: str = "onnxruntime", min_rt: str = "1.17") -> Bundle:
    return Bundle(sha256=sha, model_version_id=1, name="m", version="1.0.0", profile=profile, format=fmt,
                  precision=precision, runtime=runtime, size_bytes=1, target_path=f"{sha}.efb",
                  selected=selected, created=T0 + timedelta(seconds=age),
                  manifest={"min_runtime_version": min_rt})


BUNDLES = [
    _b("a", precision="fp32", age=1),
    _b("b", precision="int8-qdq", age=2),
    _b("c", precision="fp32", age=3, selected=True),
    _b("d", profile="p2", precision="fp32", fmt="tflite", runtime="litert", min_rt="1.0"),
]


@pytest.mark.parametrize(
    ("profile", "runtimes", "kw", "want", "reason"),
    [
        ("p1", {"onnxruntime": "1.32.0"}, {}, "c", ""),  # the compiler's selection wins
        ("p1", {"onnxruntime": "1.32.0"}, {"precision": "int8"}, "b", ""),  # "int8" matches "int8-qdq"
        ("p1", {"onnxruntime": "1.32.0"}, {"precision": "fp16"}, None, "no fp16 bundle"),
        ("p1", {"onnxruntime": "1.16.0"}, {}, None, "lacks a runtime"),
        ("p1", {}, {"precision": "fp32"}, "c", ""),  # runtimes unknown: the agent decides
        ("p2", {"onnxruntime": "1.32.0"}, {}, None, "lacks a runtime"),
        ("p2", {"litert": "1.2.0"}, {"fmt": "tflite"}, "d", ""),
        ("p3", {"onnxruntime": "1.32.0"}, {}, None, "no bundle for profile p3"),
        (None, {}, {}, None, "not announced its profile"),
    ],
)
def test_choose_bundle(profile, runtimes, kw, want, reason) -> None:  # type: ignore[no-untyped-def]
    c = choose_bundle(BUNDLES, Device(device_id="d1", profile=profile, runtimes=runtimes), **kw)
    assert (c.bundle.sha256 if c.bundle else None) == want
    assert reason in c.reason


def test_choose_bundle_prefers_latest_upload_without_selection() -> None:
    c = choose_bundle(BUNDLES[:2], Device(device_id="d1", profile="p1", runtimes={}))
    assert c.bundle is not None and c.bundle.sha256 == "b"


@pytest.mark.parametrize(
    ("current", "target", "down"),
    [(None, "1.0.0", False), ("m:2.0.0", "1.0.0", True), ("m:1.0.0", "1.0.0", False),
     ("m:1.0.0", "1.1.0", False), ("other:9.0.0", "1.0.0", False), ("m:1.0.0", "1.0.0-rc.1", True)],
)
def test_needs_downgrade(current, target, down) -> None:  # type: ignore[no-untyped-def]
    assert needs_downgrade(Device(device_id="d", model=current), "m", target) is down


def _push(h: HubHarness, path: Path) -> dict:  # type: ignore[type-arg]
    r = h.client.post("/api/v1/models", files={"bundle": (path.name, path.read_bytes())})
    assert r.status_code in (200, 201), r.text
    return r.json()["bundle"]  # type: ignore[no-any-return]


def _wait_device(h: HubHarness, device_id: str) -> None:
    wait_until(lambda: h.client.get(f"/api/v1/devices/{device_id}").json().get("profile"))


def test_deploy_publishes_retained_desired_state(
    hub: HubHarness, device_factory: Callable[..., SimDevice], session_mosquitto, tmp_path: Path  # type: ignore[no-untyped-def]
) -> None:
    fp32 = _push(hub, make_bundle(tmp_path))
    int8 = _push(hub, make_bundle(tmp_path, precision="int8-qdq"))
    gw = device_factory(session_mosquitto.url)
    arm = device_factory(session_mosquitto.url)
    gw.hello()
    arm.hello(profile="rpi4-arm64")
    _wait_device(hub, gw.device_id)
    _wait_device(hub, arm.device_id)

    r = hub.client.post("/api/v1/deployments", json={
        "model": "tiny:1.0.0", "devices": [gw.device_id, arm.device_id], "precision": "int8",
    })
    assert r.status_code == 201, r.text
    dep = r.json()
    rows = {d["device_id"]: d for d in dep["devices"]}
    assert rows[gw.device_id]["outcome"] == "pending"
    assert rows[gw.device_id]["bundle_sha256"] == int8["sha256"] != fp32["sha256"]
    assert rows[arm.device_id]["outcome"] == "skipped"
    assert "no bundle for profile rpi4-arm64" in rows[arm.device_id]["error"]
    assert dep["counts"] == {"pending": 1, "skipped": 1}

    # The desired state is retained: a device subscribing later still gets it.
    gw.subscribe("deploy")
    msg = gw.wait_for("deploy")[0]
    assert msg.retain
    payload = protocol.decode(protocol.Deployment, msg.payload)
    assert (payload.deployment_id, payload.model, payload.target_path) == (dep["id"], "tiny:1.0.0", int8["target_path"])
    arm.subscribe("deploy")
    assert not arm.received.get("deploy")

    # The device reports progress; the deployment row follows, duplicates ignored.
    for seq, state, outcome in [(1, "downloading", "in_progress"), (2, "installed", "installed"),
                                (2, "failed", "failed")]:
        gw.publish("status", protocol.StatusReport(seq=seq, deployment_id=dep["id"], state=state,
                                                   outcome=outcome, model="tiny:1.0.0", progress=1.0))
    wait_until(lambda: hub.client.get(f"/api/v1/deployments/{dep['id']}").json()["counts"].get("installed") == 1)
    hub.settle()
    got = hub.client.get(f"/api/v1/deployments/{dep['id']}").json()
    assert got["counts"] == {"installed": 1, "skipped": 1}
    assert hub.client.get(f"/api/v1/devices/{gw.device_id}").json()["model"] == "tiny:1.0.0"
    assert [d["id"] for d in hub.client.get("/api/v1/deployments").json()] == [dep["id"]]


def test_downgrade_needs_signed_sign_off(
    hub: HubHarness, device_factory: Callable[..., SimDevice], session_mosquitto, tmp_path: Path  # type: ignore[no-untyped-def]
) -> None:
    old = _push(hub, make_bundle(tmp_path, version="1.0.0"))
    _push(hub, make_bundle(tmp_path, version="2.0.0"))
    dev = device_factory(session_mosquitto.url)
    dev.hello(model="tiny:2.0.0")
    _wait_device(hub, dev.device_id)
    body = {"model": "tiny:1.0.0", "devices": [dev.device_id]}

    r = hub.client.post("/api/v1/deployments", json=body)
    assert r.status_code == 409 and "allow_downgrade" in r.json()["detail"]
    assert hub.client.get("/api/v1/deployments").json() == []
    assert not hub.hub.repository.target_custom(old["target_path"]).allow_downgrade  # type: ignore[union-attr]

    r = hub.client.post("/api/v1/deployments", json={**body, "allow_downgrade": True})
    assert r.status_code == 201, r.text
    assert hub.hub.repository.target_custom(old["target_path"]).allow_downgrade  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("body", "status", "detail"),
    [
        ({"model": "tiny", "devices": ["x"]}, 400, "NAME:VERSION"),
        ({"model": "tiny:one", "devices": ["x"]}, 400, "semantic version"),
        ({"model": "tiny:9.9.9", "devices": ["x"]}, 404, "no model"),
        ({"model": "tiny:1.0.0", "devices": ["never-seen"]}, 404, "unknown devices"),
        ({"model": "tiny:1.0.0", "devices": ["bad/id"]}, 400, "invalid device ids"),
        ({"model": "tiny:1.0.0", "devices": []}, 422, ""),
    ],
)
def test_bad_deployments(hub: HubHarness, tmp_path: Path, body, status, detail) -> None:  # type: ignore[no-untyped-def]
    _push(hub, make_bundle(tmp_path))
    r = hub.client.post("/api/v1/deployments", json=body)
    assert r.status_code == status, r.text
    assert detail in str(r.json()["detail"])


def test_deploy_topic_is_the_contract_one() -> None:
    assert topics.QOS["deploy"] == 1 and "deploy" in topics.RETAINED
