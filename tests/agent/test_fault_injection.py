"""SIGKILL the agent in every lifecycle state; on restart it must serve a valid model,
resume or roll back as the resume table says, and the hub must end with the right status.

The kill point is held open by a state hook (agent/hooks.py), the same mechanism an
operator would use, so no test-only code runs inside the agent. Each state is killed
three times: at entry (before its work), at leave (after its work, before the
transition is saved), and at entry again. A state a deployment ends in is killed three
times in its ``_enter`` hook, which runs after the outcome is saved and before the hub is
told. ``idle`` (a device provisioned with a model that has had no deployment) is
killed three times while it waits.

The hub creates no shadow deployments, so the ``candidate`` rows send the deployment over
MQTT themselves and read its outcome from the device (``edgefleet agent status``).
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

import httpx
import numpy as np
import paho.mqtt.client as mqtt
import pytest
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from rich.table import Table

from agent import topics
from agent.bundle import file_sha256
from agent.daemon import status_from_disk
from agent.lifecycle import OUTCOME, RESUME, TERMINAL, State
from agent.localapi import InferenceClient
from agent.protocol import Deployment, encode
from agent.slots import Slots
from hub.localfleet import AgentProcess, HubProcess, free_port, wait_until
from tests.support import linear_bundle

pytestmark = pytest.mark.slow

HOOK = """#!/bin/sh
d="$(dirname "$0")"
key="$EDGEFLEET_STATE-$EDGEFLEET_HOOK"
if [ -f "$d/fail-$key" ]; then rm -f "$d/fail-$key"; echo "injected failure" >&2; exit 1; fi
if [ -f "$d/arm-$key" ]; then
  rm -f "$d/arm-$key"
  touch "$d/holding"
  i=0
  while [ $i -lt 300 ] && [ ! -f "$d/release" ]; do sleep 0.1; i=$((i+1)); done
  rm -f "$d/release" "$d/holding"
fi
exit 0
"""

KILL_STATES = [State.DOWNLOADING, State.VERIFYING, State.INSTALLING, State.SELF_TEST,
               State.ACTIVATING, State.HEALTH_CHECK, State.ROLLING_BACK,
               State.COMMITTED, State.ROLLED_BACK, State.FAILED, State.CANDIDATE]
X = np.linspace(-1, 1, 8, dtype=np.float32).reshape(2, 4)


def expected_outcome(state: State) -> str:
    """What the resume table implies for a deployment killed in ``state``."""
    if state in TERMINAL:
        assert RESUME[state] == state  # a settled outcome stays
        return OUTCOME[state]
    if state == State.ROLLING_BACK:
        return "rolled_back"
    return "rolled_back" if RESUME[state] == State.ROLLING_BACK else "installed"


def kill_points(state: State) -> tuple[str, ...]:
    return ("enter",) * 3 if state in TERMINAL else ("enter", "leave", "enter")


# A deployment that is to end in ``state`` needs an earlier state to fail (hook files).
FAIL_FIRST = {State.ROLLING_BACK: "health_check-enter", State.ROLLED_BACK: "health_check-enter",
              State.FAILED: "self_test-enter"}


def test_sigkill_in_every_state(tmp_path: Path, mosquitto, procs):
    hub = HubProcess(tmp_path / "hub", broker_url=mosquitto.url,
                     env={"EDGEFLEET_DEPLOYMENT_HEALTH_WINDOW_S": "0.3"})
    procs.append(hub.start())
    client = httpx.Client(base_url=hub.url, timeout=30)

    weights: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    targets: dict[str, str] = {}
    files: dict[str, Path] = {}

    def publish(version: str, seed: int) -> None:
        path = tmp_path / f"lin-{version}.efb"
        _, _, w, b = linear_bundle(path, version=version, seed=seed)
        weights[version], files[version] = (w, b), path
        with open(path, "rb") as fh:
            r = client.post("/api/v1/models", files={"file": (path.name, fh, "application/octet-stream")})
        assert r.status_code == 201, r.text
        targets[version] = r.json()["bundle"]["target_path"]

    data_dir = tmp_path / "agent"
    hooks = data_dir / "hooks"
    hooks.mkdir(parents=True)
    for state in State:
        for when in ("enter", "leave"):
            p = hooks / f"{state.value}_{when}"
            p.write_text(HOOK)
            p.chmod(0o755)

    def start_agent() -> AgentProcess:
        a = AgentProcess("fi-dev", "x86-gateway-vnni", mosquitto.url, data_dir, trust_root=hub.root_json(),
                         api_port=free_port(), telemetry_interval=1.0)
        procs.append(a.start())
        return a

    def deploy(version: str) -> str:
        r = client.post("/api/v1/deployments", json={"model": f"lin:{version}", "devices": ["fi-dev"]})
        assert r.status_code == 201, r.text
        return r.json()["id"]

    def deploy_shadow(version: str, dep_id: str) -> str:
        """A shadow deployment, sent as the hub would send any other (the hub makes none)."""
        msg = Deployment(deployment_id=dep_id, model=f"lin:{version}", target_path=targets[version],
                         health_window_s=0.3, mode="shadow", ratio=0.5)
        _publish_retained(mosquitto.url, topics.device_topic("fi-dev", "deploy"), encode(msg))
        return dep_id

    def outcome(dep_id: str) -> str | None:
        dep = client.get(f"/api/v1/deployments/{dep_id}").json()
        result = dep["devices"][0]["outcome"]
        return result if result in ("installed", "rolled_back", "failed", "rejected") else None

    def device_outcome(dep_id: str) -> str | None:
        """The outcome the device saved (``edgefleet agent status``), for a deployment the hub
        did not make."""
        st = status_from_disk(data_dir)
        return st["state"] if st["deployment_id"] == dep_id and State(st["state"]) in TERMINAL else None

    def served_version(a: AgentProcess) -> str:
        ic = InferenceClient(a.api_url, timeout=5)
        wait_until(lambda: _ready(a), 20, 0.05, "local API")
        got = ic.infer("lin", {"input": X})["logits"]
        for version, (w, b) in weights.items():
            if np.allclose(got, X @ w + b, rtol=1e-5, atol=1e-5):
                return version
        raise AssertionError("served outputs match no known version")

    def hub_model() -> str | None:
        return client.get("/api/v1/devices/fi-dev").json()["model"]

    # A device provisioned with 1.0.0 (installed before its first start), idle: no
    # deployment has reached it.
    publish("1.0.0", seed=100)
    slots = Slots(data_dir / "slots")
    slots.install(files["1.0.0"], "a", sha256=file_sha256(files["1.0.0"]))
    slots.activate("a")
    agent = start_agent()
    wait_until(lambda: client.get("/api/v1/devices/fi-dev").status_code == 200, 30, 0.2, "device")
    rows = []
    current = "1.0.0"
    for _ in range(3):
        wait_until(lambda: hub_model() == "lin:1.0.0", 30, 0.1, "hub to see the provisioned model")
        agent.kill()
        agent = start_agent()
        first = served_version(agent)
        assert status_from_disk(data_dir)["state"] == "idle"
        wait_until(lambda: hub_model() == "lin:1.0.0", 30, 0.1, "hub to see the model again")
        rows.append(("idle", "waiting", "idle", "-", first, served_version(agent), hub_model()))
        assert first == "1.0.0", rows[-1]

    n = 0
    for state in KILL_STATES:
        for when in kill_points(state):
            n += 1
            version = f"1.0.{n}"
            publish(version, seed=100 + n)
            if state in FAIL_FIRST:
                (hooks / f"fail-{FAIL_FIRST[state]}").touch()
            (hooks / f"arm-{state.value}-{when}").touch()
            shadow = state == State.CANDIDATE
            dep_id = deploy_shadow(version, f"shadow-{n}") if shadow else deploy(version)
            wait_until(lambda: (hooks / "holding").exists(), 30, 0.02, f"hold in {state}/{when}")
            agent.kill()
            (hooks / "release").touch()
            wait_until(lambda: not (hooks / "holding").exists(), 40, 0.05, "hook to exit")
            agent = start_agent()
            # Never without a model: the restarted agent serves old or new at once.
            first = served_version(agent)
            assert first in (current, version)
            read = device_outcome if shadow else outcome
            got = wait_until(lambda d=dep_id, f=read: f(d), 60, 0.1, f"outcome after kill in {state}/{when}")
            want = expected_outcome(state)
            now = served_version(agent)
            rows.append((state.value, when, want, got if not shadow else f"{got} (device)", first, now, hub_model()))
            assert got == want, rows[-1]
            assert now == (version if want == "installed" else current), rows[-1]
            if shadow:
                # The candidate runs beside the active model again, reloaded from its slot.
                wait_until(lambda v=version, a=agent: _candidate_ratio(a, v) == 0.5, 20, 0.1, "shadow candidate")
            assert hub_model() == f"lin:{now}", rows[-1]
            current = now

    table = Table(title="SIGKILL in each lifecycle state")
    for col in ("state", "killed at", "expected", "hub outcome", "served after restart", "served at end", "hub model"):
        table.add_column(col)
    for r in rows:
        table.add_row(*r)
    Console(width=140).print(table)
    assert len(rows) == 3 * (len(KILL_STATES) + 1)
    assert {r[0] for r in rows} == {st.value for st in State}  # every state, three times each
    # Every deployment above was checked against TUF metadata, in the helper process: the
    # serving process never mapped the crypto behind it (agent.trust, docs/agent.md).
    maps = Path(f"/proc/{agent.proc.pid}/maps").read_text()
    assert "onnxruntime" in maps
    assert "cryptography" not in maps and "_cffi_backend" not in maps


def _publish_retained(broker_url: str, topic: str, payload: bytes) -> None:
    u = urlparse(broker_url)
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    c.connect(u.hostname or "127.0.0.1", u.port or 1883)
    c.loop_start()
    c.publish(topic, payload, qos=1, retain=True).wait_for_publish(10)
    c.loop_stop()
    c.disconnect()


def _candidate_ratio(a: AgentProcess, version: str) -> float | None:
    text = httpx.get(a.api_url + "/metrics", timeout=5).text
    for fam in text_string_to_metric_families(text):
        for sample in fam.samples:
            if sample.name == "edgefleet_agent_candidate_ratio" and sample.labels.get("version") == version:
                return sample.value
    return None


def _ready(a: AgentProcess) -> bool:
    try:
        return httpx.get(a.api_url + "/v2/health/ready", timeout=0.5).status_code == 200
    except httpx.HTTPError:
        return False
