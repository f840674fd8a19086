"""The walking skeleton, end to end with real processes.

compile -> upload -> sign -> deploy over MQTT -> verify, install, self-test -> serve
-> telemetry back into the hub's database; with a real Mosquitto and with the hub's
embedded broker.
"""

from __future__ import annotations

import shutil
import sqlite3

import httpx
import numpy as np
import paho.mqtt.client as mqtt
import pytest

from agent import topics
from agent.bundle import file_sha256, open_unpacked, unpack
from agent.localapi import InferenceClient
from compiler.measure import ort_session
from hub.localfleet import AgentProcess, HubProcess, free_port, wait_until

pytestmark = pytest.mark.slow


def _upload(client: httpx.Client, paths) -> None:
    for p in paths:
        with open(p, "rb") as fh:
            r = client.post("/api/v1/models", files={"file": (p.name, fh, "application/octet-stream")})
        assert r.status_code in (200, 201), r.text


def _devices(client: httpx.Client) -> dict[str, dict]:
    return {d["device_id"]: d for d in client.get("/api/v1/devices").json()}


def _wait_deployment(client: httpx.Client, dep_id: str, n: int, timeout: float = 90) -> dict:
    def done():
        dep = client.get(f"/api/v1/deployments/{dep_id}").json()
        finished = sum(v for k, v in dep["counts"].items() if k not in ("pending", "in_progress", "sent"))
        return dep if finished >= n else None

    return wait_until(done, timeout, 0.25, f"deployment {dep_id}")


def _reference_outputs(bundle_path, x, tmp_path) -> np.ndarray:
    """What the compiler's own bundle computes on ``x``, outside any agent."""
    dest = tmp_path / f"ref-{bundle_path.stem}"
    b = open_unpacked(dest) if dest.exists() else unpack(bundle_path, dest)
    sess = ort_session(b.model_path.read_bytes(), 2)  # the compiler's measuring session
    return sess.run(None, {b.manifest.inputs[0].name: x})[0]


@pytest.fixture(params=["mosquitto", "embedded"])
def broker_kind(request):
    return request.param


def test_int8_deploys_to_three_agents_and_serves_compiler_predictions(
    broker_kind, request, compiled, procs, tmp_path
):
    broker_url = None
    if broker_kind == "mosquitto":
        broker_url = request.getfixturevalue("mosquitto").url
    hub = HubProcess(tmp_path / "hub", broker_url=broker_url)
    procs.append(hub.start())
    client = httpx.Client(base_url=hub.url, timeout=30)
    int8 = compiled.bundles("int8", technique="static-qdq")  # per-channel, one per profile
    assert len(int8) == 2
    _upload(client, int8)

    profiles = ["x86-gateway-vnni", "rpi4-arm64", "x86-gateway-vnni"]
    agents = []
    for i, profile in enumerate(profiles):
        a = AgentProcess(f"e2e-{broker_kind}-{i}", profile, hub.broker, tmp_path / f"agent{i}",
                         trust_root=hub.root_json(), api_port=free_port(), telemetry_interval=1.0)
        procs.append(a.start())
        agents.append(a)
    ids = [a.device_id for a in agents]
    wait_until(lambda: all(d in _devices(client) and _devices(client)[d]["online"] for d in ids),
               60, 0.25, "agents online")

    r = client.post("/api/v1/deployments", json={"model": "digits-cnn:1.0.0", "devices": ids, "precision": "int8"})
    assert r.status_code == 201, r.text
    dep = _wait_deployment(client, r.json()["id"], 3)
    assert dep["counts"] == {"installed": 3}, dep

    devs = _devices(client)
    x = compiled.eval_x[:64]
    for a in agents:
        assert devs[a.device_id]["state"] == "committed"
        assert devs[a.device_id]["model"] == "digits-cnn:1.0.0"
        bundle = next(p for p in int8 if f"-{a.profile}-" in p.name)
        want = _reference_outputs(bundle, x, tmp_path)
        ic = InferenceClient(a.api_url)
        name_in = ic.metadata("digits-cnn")["inputs"][0]["name"]
        got = next(iter(ic.infer("digits-cnn", {name_in: x}).values()))
        np.testing.assert_array_equal(got.argmax(1), want.argmax(1))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

    # Telemetry rows reach the hub's database (SQLite file in its data dir).
    def telemetry_rows():
        with sqlite3.connect(tmp_path / "hub" / "hub.db") as db:
            rows = db.execute(
                "SELECT device_id, SUM(inference_count) FROM telemetry GROUP BY device_id").fetchall()
        counts = dict(rows)
        return counts if all(counts.get(d, 0) >= 1 for d in ids) else None

    counts = wait_until(telemetry_rows, 30, 0.5, "telemetry rows")
    assert set(counts) >= set(ids)


def test_refusals_are_visible_at_the_hub_and_old_model_keeps_serving(compiled, procs, tmp_path, mosquitto):
    """Tampered bundle, downgrade without signed rollback, and a re-keyed repository."""
    hub = HubProcess(tmp_path / "hub", broker_url=mosquitto.url)
    procs.append(hub.start())
    client = httpx.Client(base_url=hub.url, timeout=30)
    fp32 = [p for p in compiled.bundles("fp32") if "x86-gateway-vnni" in p.name]
    _upload(client, fp32)
    a = AgentProcess("e2e-refuse", "x86-gateway-vnni", hub.broker, tmp_path / "agent",
                     trust_root=hub.root_json(), api_port=free_port(), telemetry_interval=1.0)
    procs.append(a.start())
    wait_until(lambda: _devices(client).get("e2e-refuse", {}).get("online"), 60, 0.25, "agent online")
    r = client.post("/api/v1/deployments", json={"model": "digits-cnn:1.0.0", "devices": ["e2e-refuse"]})
    assert _wait_deployment(client, r.json()["id"], 1)["counts"] == {"installed": 1}
    ic = InferenceClient(a.api_url)
    x = compiled.eval_x[:8]
    name_in = ic.metadata("digits-cnn")["inputs"][0]["name"]
    before = next(iter(ic.infer("digits-cnn", {name_in: x}).values()))

    # 1. A bundle whose stored bytes were tampered with after signing.
    from tests.e2e.rebuild import rebuild_with_version

    v2 = rebuild_with_version(fp32[0], "1.1.0", tmp_path)
    _upload(client, [v2])
    stored = tmp_path / "hub" / "repository" / "targets" / f"{file_sha256(v2)}.efb"
    data = bytearray(stored.read_bytes())
    data[700] ^= 0x01
    stored.write_bytes(bytes(data))
    r = client.post("/api/v1/deployments", json={"model": "digits-cnn:1.1.0", "devices": ["e2e-refuse"]})
    dep = _wait_deployment(client, r.json()["id"], 1)
    assert dep["counts"] == {"rejected": 1}, dep
    row = dep["devices"][0]
    assert "verification" in (row.get("error") or "")
    np.testing.assert_array_equal(next(iter(ic.infer("digits-cnn", {name_in: x}).values())), before)

    # 2. An older version than the device runs needs an explicit, signed rollback.
    v0 = rebuild_with_version(fp32[0], "0.9.0", tmp_path)
    _upload(client, [v0])
    r = client.post("/api/v1/deployments", json={"model": "digits-cnn:0.9.0", "devices": ["e2e-refuse"]})
    assert r.status_code == 409, r.text
    assert "downgrade" in r.text.lower()
    np.testing.assert_array_equal(next(iter(ic.infer("digits-cnn", {name_in: x}).values())), before)

    # 3. The repository is re-keyed (all metadata signed by keys the device never trusted).
    hub.stop()
    shutil.rmtree(tmp_path / "hub" / "repository" / "keys")
    shutil.rmtree(tmp_path / "hub" / "repository" / "metadata")
    hub2 = HubProcess(tmp_path / "hub", broker_url=mosquitto.url, port=hub.port)
    procs.append(hub2.start())
    _upload(client, [rebuild_with_version(fp32[0], "1.2.0", tmp_path)])
    r = client.post("/api/v1/deployments", json={"model": "digits-cnn:1.2.0", "devices": ["e2e-refuse"]})
    dep = _wait_deployment(client, r.json()["id"], 1)
    assert dep["counts"] == {"rejected": 1}, dep
    dev = _devices(client)["e2e-refuse"]
    assert dev["model"] == "digits-cnn:1.0.0"
    np.testing.assert_array_equal(next(iter(ic.infer("digits-cnn", {name_in: x}).values())), before)


def test_http_fetcher_installs_and_resumes_with_range(compiled, procs, tmp_path, mosquitto):
    """The HTTP alternative to MQTT transfer: metadata and bundle from the hub's REST API."""
    from agent.transfer import HttpRepoClient

    hub = HubProcess(tmp_path / "hub", broker_url=mosquitto.url)
    procs.append(hub.start())
    client = httpx.Client(base_url=hub.url, timeout=30)
    fp32 = [p for p in compiled.bundles("fp32") if "x86-gateway-vnni" in p.name]
    _upload(client, fp32)
    repo_url = hub.url + "/api/v1/repository/"
    a = AgentProcess("e2e-http", "x86-gateway-vnni", mosquitto.url, tmp_path / "agent",
                     trust_root=hub.root_json(), api_port=free_port(), repository_url=repo_url)
    procs.append(a.start())
    wait_until(lambda: _devices(client).get("e2e-http", {}).get("online"), 60, 0.25, "agent online")
    mqtt_requests: list[bytes] = []
    spy = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    spy.on_message = lambda c, u, m: mqtt_requests.append(m.payload)
    spy.connect("127.0.0.1", mosquitto.port)
    spy.subscribe(topics.device_topic("e2e-http", "repo/get"))
    spy.loop_start()
    r = client.post("/api/v1/deployments", json={"model": "digits-cnn:1.0.0", "devices": ["e2e-http"]})
    assert _wait_deployment(client, r.json()["id"], 1)["counts"] == {"installed": 1}
    spy.loop_stop()
    assert mqtt_requests == []  # everything came over HTTP

    # Resume: a partial file is completed with a Range request, not fetched again.
    sha = file_sha256(fp32[0])
    size = fp32[0].stat().st_size
    dest = tmp_path / "resume" / f"{sha}.efb"
    dest.parent.mkdir()
    dest.with_name(dest.name + ".part").write_bytes(fp32[0].read_bytes()[: size // 2])
    http = HttpRepoClient(repo_url)
    http.download(f"targets/{sha}.efb", dest, size)
    assert dest.read_bytes() == fp32[0].read_bytes()
    assert http.bytes_received == size - size // 2
