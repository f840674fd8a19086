"""SIGKILL the agent in every lifecycle state; on restart it must serve a valid model,
resume or roll back as the resume table says, and the hub must end with the right status.

The kill point is held open by a state hook (agent/hooks.py), the same mechanism an
operator would use, so no test-only code runs inside the agent. Each state is killed
three times: at entry (before its work), at leave (after its work, before the
transition is saved), and at entry again.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import pytest
from rich.console import Console
from rich.table import Table

from agent.lifecycle import RESUME, State
from agent.localapi import InferenceClient
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
               State.ACTIVATING, State.HEALTH_CHECK, State.ROLLING_BACK]
X = np.linspace(-1, 1, 8, dtype=np.float32).reshape(2, 4)


def expected_outcome(state: State) -> str:
    """What the resume table implies for a deployment killed in ``state``."""
    if state == State.ROLLING_BACK:
        return "rolled_back"
    return "rolled_back" if RESUME[state] == State.ROLLING_BACK else "installed"


def test_sigkill_in_every_state(tmp_path: Path, mosquitto, procs):
    hub = HubProcess(tmp_path / "hub", broker_url=mosquitto.url,
                     env={"EDGEFLEET_DEPLOYMENT_HEALTH_WINDOW_S": "0.3"})
    procs.append(hub.start())
    client = httpx.Client(base_url=hub.url, timeout=30)

    weights: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def publish(version: str, seed: int) -> None:
        path = tmp_path / f"lin-{version}.efb"
        _, _, w, b = linear_bundle(path, version=version, seed=seed)
        weights[version] = (w, b)
        with open(path, "rb") as fh:
            r = client.post("/api/v1/models", files={"file": (path.name, fh, "application/octet-stream")})
        assert r.status_code == 201, r.text

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

    def outcome(dep_id: str) -> str | None:
        dep = client.get(f"/api/v1/deployments/{dep_id}").json()
        result = dep["devices"][0]["outcome"]
        return result if result in ("installed", "rolled_back", "failed", "rejected") else None

    def served_version(a: AgentProcess) -> str:
        ic = InferenceClient(a.api_url, timeout=5)
        wait_until(lambda: _ready(a), 20, 0.05, "local API")
        got = ic.infer("lin", {"input": X})["logits"]
        for version, (w, b) in weights.items():
            if np.allclose(got, X @ w + b, rtol=1e-5, atol=1e-5):
                return version
        raise AssertionError("served outputs match no known version")

    publish("1.0.0", seed=100)
    agent = start_agent()
    wait_until(lambda: client.get("/api/v1/devices/fi-dev").status_code == 200, 30, 0.2, "device")
    first_dep = deploy("1.0.0")
    assert wait_until(lambda: outcome(first_dep), 30, 0.2, "first install") == "installed"

    rows = []
    current = "1.0.0"
    n = 0
    for state in KILL_STATES:
        for when in ("enter", "leave", "enter"):
            n += 1
            version = f"1.0.{n}"
            publish(version, seed=100 + n)
            if state == State.ROLLING_BACK:
                (hooks / "fail-health_check-enter").touch()
            (hooks / f"arm-{state.value}-{when}").touch()
            dep_id = deploy(version)
            wait_until(lambda: (hooks / "holding").exists(), 30, 0.02, f"hold in {state}/{when}")
            agent.kill()
            (hooks / "release").touch()
            wait_until(lambda: not (hooks / "holding").exists(), 40, 0.05, "hook to exit")
            agent = start_agent()
            # Never without a model: the restarted agent serves old or new at once.
            first = served_version(agent)
            assert first in (current, version)
            got = wait_until(lambda d=dep_id: outcome(d), 60, 0.1, f"outcome after kill in {state}/{when}")
            want = expected_outcome(state)
            now = served_version(agent)
            dev = client.get("/api/v1/devices/fi-dev").json()
            rows.append((state.value, when, want, got, first, now, dev["model"]))
            assert got == want, rows[-1]
            assert now == (version if want == "installed" else current), rows[-1]
            assert dev["model"] == f"lin:{now}", rows[-1]
            current = now

    table = Table(title="SIGKILL in each lifecycle state")
    for col in ("state", "killed at", "expected", "hub outcome", "served after restart", "served at end", "hub model"):
        table.add_column(col)
    for r in rows:
        table.add_row(*r)
    Console(width=140).print(table)
    assert len(rows) == 3 * len(KILL_STATES)
    # Every deployment above was checked against TUF metadata, in the helper process: the
    # serving process never mapped the crypto behind it (agent.trust, docs/agent.md).
    maps = Path(f"/proc/{agent.proc.pid}/maps").read_text()
    assert "onnxruntime" in maps
    assert "cryptography" not in maps and "_cffi_backend" not in maps


def _ready(a: AgentProcess) -> bool:
    try:
        return httpx.get(a.api_url + "/v2/health/ready", timeout=0.5).status_code == 200
    except httpx.HTTPError:
        return False
