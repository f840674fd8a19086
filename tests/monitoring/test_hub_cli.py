"""``edgefleet drift`` and ``edgefleet alerts`` against a live hub served by uvicorn."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import uvicorn
from click.testing import CliRunner

from agent.bundle import Reference
from hub import drift
from hub.app import Hub, create_app
from hub.cli_monitoring import alerts_group, drift_group
from hub.monitoring import MonitoringSettings
from hub.server import bind_socket
from tests.hub.conftest import make_settings, wait_until
from tests.monitoring.hub_support import add_devices, device_sketch, make_ref_bundle, store_sketches

MODEL = "clf:2.1.0"


@pytest.fixture
def live_hub(tmp_path: Path) -> Iterator[tuple[str, Hub]]:
    settings = make_settings(tmp_path / "hub", f"sqlite:///{tmp_path / 'hub.db'}", None)
    ready: list[Hub] = []
    app = create_app(settings, on_ready=ready.append)
    app.state.monitoring_settings = MonitoringSettings(interval_s=3600)
    sock = bind_socket("127.0.0.1", 0)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    t = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    t.start()
    wait_until(lambda: ready and httpx.get(f"{url}/healthz").status_code == 200)
    yield url, ready[0]
    server.should_exit = True
    t.join(10)


def test_drift_and_alerts_commands(live_hub: tuple[str, Hub], reference: Reference,
                                   rng: np.random.Generator, tmp_path: Path) -> None:
    url, hub = live_hub
    with open(make_ref_bundle(tmp_path, reference, version="2.1.0"), "rb") as fh:
        assert httpx.post(f"{url}/api/v1/models", files={"bundle": ("b.efb", fh)}).status_code == 201
    add_devices(hub.db, [("cli-a", "rpi4", ["canary"]), ("cli-b", "x86", [])], model=MODEL)
    now = time.time()
    sketches = {d: device_sketch(reference, MODEL, rng, now - 900, now - 300, rows=600,
                                 scale=3.0 if d == "cli-a" else 1.0) for d in ("cli-a", "cli-b")}
    store_sketches(hub.db, list(sketches.items()))
    runner = CliRunner()

    r = runner.invoke(drift_group, ["show", "clf:2.1.0", "--json", "--hub", url])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.output)
    want = drift.drift_report(reference, drift.merge(sketches.values(), reference=reference))
    assert rows == [w.model_dump(mode="json") for w in want]
    assert {"feature", "psi", "ks", "status"} <= rows[0].keys()
    assert {x["feature"]: x["status"] for x in rows}["x1"] == "alert"

    r = runner.invoke(drift_group, ["show", "clf", "--select", "tag=canary", "--window", "30m",
                                    "--control", "profile=x86", "--hub", url])
    assert r.exit_code == 0, r.output
    assert "x1" in r.output and "alert" in r.output and "against control profile=x86" in r.output

    for args in (["show", "clf:", "--hub", url], ["show", "clf", "--select", "bogus=1", "--hub", url],
                 ["show", "nosuch", "--hub", url]):
        r = runner.invoke(drift_group, args)
        assert r.exit_code != 0 and "Traceback" not in r.output

    r = runner.invoke(alerts_group, ["--json", "--hub", url])
    assert r.exit_code == 0 and json.loads(r.output) == []
    r = runner.invoke(alerts_group, ["--hub", url, "evaluate"])
    assert r.exit_code == 0 and "opened" in r.output, r.output
    r = runner.invoke(alerts_group, ["--state", "open", "--json", "--hub", url])
    opened = json.loads(r.output)
    assert {"x1"} <= {a["subject"] for a in opened} and all(a["state"] == "open" for a in opened)
    r = runner.invoke(alerts_group, ["--hub", url])
    assert r.exit_code == 0 and "x1" in r.output
    assert json.loads(runner.invoke(alerts_group, ["--state", "resolved", "--json", "--hub", url]).output) == []
    r = runner.invoke(alerts_group, ["--hub", url, "retrain", "--json"])
    assert r.exit_code == 0 and json.loads(r.output) == []

    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"thresholds": {"psi_warn": 0.2, "psi_alert": 0.5}, "retrain_drift_windows": 5}))
    r = runner.invoke(drift_group, ["policy", "clf", "--set", str(policy), "--hub", url])
    assert r.exit_code == 0 and json.loads(r.output)["thresholds"]["psi_alert"] == 0.5
    shown = json.loads(runner.invoke(drift_group, ["show", "clf", "--json", "--hub", url]).output)
    assert all(x["reason"] == "" or "0.5" in x["reason"] or "0.2" in x["reason"] for x in shown if x["status"] != "ok")

    for args in (["performance", "clf", "--hub", url], ["ops", "--window", "1h", "--hub", url]):
        r = runner.invoke(drift_group, args)
        assert r.exit_code == 0, r.output
