"""Issue #4 acceptance: 50 simulated devices (the real agent) on a real Mosquitto,
driven by a real hub process, on SQLite and (marked ``postgres``) on PostgreSQL."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import pytest
from click.testing import CliRunner

from agent.daemon import status_from_disk
from hub.cli import audit_command, rollout_group
from hub.localfleet import wait_until
from tests.campaigns.conftest import N_DEVICES, Fleet

pytestmark = pytest.mark.slow

V1, V2, V3 = "lin:1.0.0", "lin:2.0.0", "lin:3.0.0"


def _cli(fleet: Fleet, *args: str, cmd: Any = rollout_group) -> str:
    res = CliRunner().invoke(cmd, [*args, "--hub", fleet.hub.url], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return res.output


def _transitions(fleet: Fleet, cid: str) -> list[tuple[str, str]]:
    return [(e["detail"]["from"], e["detail"]["to"]) for e in fleet.audit(cid)
            if e["action"] == "campaign.transition"]


def test_clean_run_completes_in_three_waves(fleet_factory) -> None:
    f: Fleet = fleet_factory()
    res = CliRunner().invoke(rollout_group, [
        "create", V2, "--select", "all", "--waves", "10,50,100", "--soak", "1s", "--gate", "install_failures<=0",
        "--gate", "health_failures<=0", "--gate", "psi<=0.25", "--hub", f.hub.url], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    cid = res.stdout.strip()  # the id alone on stdout (the summary goes to stderr): id=$(... create ...)
    assert f"campaign {cid}: {V2} to 50 devices in 3 waves" in res.stderr
    c = f.wait_state(cid, {"completed", "paused", "rolled_back", "aborted"})
    assert c["state"] == "completed", c["reason"]
    status = json.loads(_cli(f, "status", cid, "--json"))
    assert status["state"] == "completed"
    assert [w["size"] for w in status["waves"]] == [5, 20, 25]
    assert [w["counts"] for w in status["waves"]] == [{"updated": 5}, {"updated": 20}, {"updated": 25}]
    assert all(w["status"] == "passed" for w in status["waves"])
    assert len(status["devices"]) == N_DEVICES
    assert all(d["state"] == "updated" and d["model"] == V2 for d in status["devices"])
    devs = f.devices()
    assert all(devs[d["device_id"]]["previous_model"] == V1 for d in status["devices"])
    assert _transitions(f, cid) == [
        ("running", "soaking"), ("soaking", "running"),
        ("running", "soaking"), ("soaking", "running"),
        ("running", "soaking"), ("soaking", "completed"),
    ]
    # Devices are released: a later campaign may take them.
    assert all(d["campaign_id"] is None for d in devs.values())


def test_failing_health_trips_the_canary_and_rolls_back(fleet_factory, sqlite_only) -> None:
    f: Fleet = fleet_factory(fail_health=0.3)
    c = f.create(model=V2, select="all", waves="10,50,100", soak_s=1.0,
                 gates=["health_failures<=0"], on_fail="rollback")
    c = f.wait_state(c["id"], {"rolled_back", "completed", "paused"})
    assert c["state"] == "rolled_back", c["reason"]
    canary = [d for d in c["devices"] if d["wave"] == 0]
    assert len(canary) == 5
    states = Counter(d["state"] for d in canary)
    assert states["health_failed"] >= 1 and states["reverted"] >= 1, states
    assert set(states) <= {"health_failed", "reverted"}, states
    # Every device of the canary reports its previous version; nobody else was touched.
    devs = f.devices()
    assert all(devs[d["device_id"]]["model"] == V1 for d in c["devices"])
    assert all(d["state"] == "cancelled" for d in c["devices"] if d["wave"] > 0)
    log = f.audit(c["id"])
    trip = [e for e in log if e["action"] == "campaign.transition" and e["detail"]["to"] == "rolling_back"]
    assert len(trip) == 1 and "health_failures<=0 failed" in trip[0]["reason"], trip
    assert trip[0]["actor"] == "hub"
    assert log[-1]["detail"]["to"] == "rolled_back"
    rows = json.loads(_cli(f, "--campaign", c["id"], "--json", cmd=audit_command))
    assert [r["reason"] for r in rows if r["detail"].get("to") == "rolling_back"] == [trip[0]["reason"]]


def test_shifted_predictions_trip_the_quality_gate_and_unchanged_ones_pass(fleet_factory, sqlite_only) -> None:
    f: Fleet = fleet_factory()
    gates = ["psi<=0.25"]
    shifted = f.create(model=V3, select="all", waves="10,50,100", soak_s=3.0, gates=gates, on_fail="pause")
    c = f.wait_state(shifted["id"], {"paused", "completed"})
    assert c["state"] == "paused", c["reason"]
    verdict = c["waves"][0]["verdicts"][0]
    assert not verdict["passed"] and verdict["value"] > 0.25, verdict
    assert "psi<=0.25 failed" in c["reason"]
    # An operator rolls the canary back (idempotent: twice is fine).
    _cli(f, "rollback", shifted["id"], "--reason", "predictions shifted")
    _cli(f, "rollback", shifted["id"])
    c = f.wait_state(shifted["id"], {"rolled_back"})
    assert all(f.devices()[d]["model"] == V1 for d in (x["device_id"] for x in c["devices"]))
    ops = [e for e in f.audit(shifted["id"]) if e["action"] == "rollout.rollback"]
    assert [e["detail"].get("noop", False) for e in ops] == [False, True]
    assert ops[0]["reason"] == "predictions shifted"

    same = f.create(model=V2, select="all", waves="10,100", soak_s=3.0, gates=gates, on_fail="pause")
    c = f.wait_state(same["id"], {"paused", "completed"})
    assert c["state"] == "completed", c["reason"]
    v = c["waves"][0]["verdicts"][0]
    assert v["passed"] and v["value"] is not None and v["value"] < 0.1, v


def test_offline_device_is_pending_then_updated_when_it_returns(fleet_factory, sqlite_only) -> None:
    f: Fleet = fleet_factory()
    gone = "sim-0003"  # in the canary
    f.sim.set_online(gone, False)
    wait_until(lambda: not f.devices()[gone]["online"], 30, 0.3, "device offline")
    c = f.create(model=V2, select="all", waves="10,50,100", soak_s=1.0, gates=["install_failures<=0"])

    def later_wave() -> dict[str, Any] | None:
        cur = f.campaign(c["id"])
        return cur if cur["wave_index"] >= 1 else None

    cur = wait_until(later_wave, 90, 0.3, "second wave")
    dev = next(d for d in cur["devices"] if d["device_id"] == gone)
    assert dev["state"] == "pending" and dev["model"] == V1 and not dev["online"]
    assert cur["waves"][0]["counts"] == {"updated": 4, "pending": 1}
    f.sim.set_online(gone, True)
    done = f.wait_state(c["id"], {"completed", "paused"})
    assert done["state"] == "completed", done["reason"]
    dev = next(d for d in done["devices"] if d["device_id"] == gone)
    assert dev["state"] == "updated" and dev["model"] == V2


def test_hub_killed_in_wave_two_resumes_without_double_updates(fleet_factory) -> None:
    f: Fleet = fleet_factory()
    c = f.create(model=V2, select="all", waves="10,50,100", soak_s=1.0,
                 gates=["install_failures<=0", "health_failures<=0"])

    def in_wave_two() -> bool:
        cur = f.campaign(c["id"])
        w = cur["waves"][1]["counts"]
        return cur["wave_index"] == 1 and cur["state"] == "running" and w.get("deploying", 0) > 0

    wait_until(in_wave_two, 90, 0.05, "wave 2 deploying")
    f.hub.kill()
    f.hub.start()
    f.reconnect()
    done = f.wait_state(c["id"], {"completed", "paused", "rolled_back"})
    assert done["state"] == "completed", done["reason"]
    assert done["counts"] == {"updated": N_DEVICES}
    assert [w["counts"] for w in done["waves"]] == [{"updated": 5}, {"updated": 20}, {"updated": 25}]
    assert all(w["status"] == "passed" for w in done["waves"])
    assert _transitions(f, c["id"]) == [
        ("running", "soaking"), ("soaking", "running"),
        ("running", "soaking"), ("soaking", "running"),
        ("running", "soaking"), ("soaking", "completed"),
    ]
    # No device was sent two deployments, and each agent ran exactly the one it was sent.
    deps = f.http.get("/api/v1/deployments", params={"limit": 1000}).json()
    sent = Counter(d["device_id"] for dep in deps for d in dep["devices"])
    assert set(sent.values()) == {1} and len(sent) == N_DEVICES
    for d in done["devices"]:
        st = status_from_disk(f.sim.cfg.data_dir / d["device_id"])
        assert st["deployment_id"] == d["deployment_id"] and st["state"] == "committed"
        assert st["model"] == V2 and st["history"].count("installing") == 1, st
