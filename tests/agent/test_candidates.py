"""Shadow and split (A/B) candidates beside the active model."""

from __future__ import annotations

import time

import numpy as np
import paho.mqtt.client as mqtt

from agent import topics
from agent.protocol import Telemetry, decode

ROWS = np.random.default_rng(3).normal(size=(64, 4)).astype(np.float32)


def _telemetry(bench, device_id: str) -> list[Telemetry]:
    got: list[Telemetry] = []
    sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    sub.on_message = lambda c, u, m: got.append(decode(Telemetry, m.payload))
    sub.connect("127.0.0.1", bench.broker.port)
    sub.subscribe(topics.device_topic(device_id, "telemetry"), qos=1)
    sub.loop_start()
    bench.closers.append(sub.loop_stop)
    return got


def _with_candidate(bench, mode: str, ratio: float):
    """An agent serving v1 (deployment d1) with v2 beside it as a ``mode`` candidate
    (deployment d2). Returns (agent, (tp1, m1, w1, b1), (tp2, m2, w2, b2))."""
    a = bench.agent()
    v1 = bench.bundle("1.0.0", seed=1)
    v2 = bench.bundle("1.1.0", seed=2)
    bench.deploy("dev1", "d1", v1[0], v1[1].ref)
    assert bench.wait_for(a, "d1") == "installed"
    bench.deploy("dev1", "d2", v2[0], v2[1].ref, mode=mode, ratio=ratio)
    assert bench.wait_for(a, "d2") == "candidate"
    return a, v1, v2


def test_shadow_never_changes_responses_and_reports_agreement(bench):
    tel = _telemetry(bench, "dev1")
    a, (tp1, m1, w1, b1), (tp2, m2, w2, b2) = _with_candidate(bench, "shadow", 1.0)
    assert a.server.candidate is not None and a.server.candidate.model.ref == "lin:1.1.0"
    for i in range(len(ROWS)):
        out = a.infer({"input": ROWS[i:i + 1]})["logits"]
        np.testing.assert_allclose(out, ROWS[i:i + 1] @ w1 + b1, rtol=1e-5, atol=1e-5)
    want_agree = int(np.sum((ROWS @ w1 + b1).argmax(1) == (ROWS @ w2 + b2).argmax(1)))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and sum(t.candidate.compared for t in tel if t.candidate) < len(ROWS):
        time.sleep(0.1)
    stats = [t.candidate for t in tel if t.candidate is not None]
    assert sum(s.compared for s in stats) == len(ROWS)
    assert sum(s.agreed for s in stats) == want_agree
    assert all(s.mode == "shadow" and s.model == "lin:1.1.0" for s in stats)
    assert a.model_ref == "lin:1.0.0"
    # Promote: a normal deployment of the candidate ends the shadow run.
    bench.deploy("dev1", "d3", tp2, m2.ref)
    assert bench.wait_for(a, "d3") == "installed"
    assert a.server.candidate is None and a.model_ref == "lin:1.1.0"


def test_split_serves_a_share_with_the_candidate_and_survives_restart(bench):
    a, (tp1, m1, w1, b1), (tp2, m2, w2, b2) = _with_candidate(bench, "split", 0.3)
    x = ROWS[:1]
    served = {"old": 0, "new": 0}
    for _ in range(400):
        out = a.infer({"input": x})["logits"]
        if np.allclose(out, x @ w2 + b2, rtol=1e-5, atol=1e-5):
            served["new"] += 1
        else:
            np.testing.assert_allclose(out, x @ w1 + b1, rtol=1e-5, atol=1e-5)
            served["old"] += 1
    assert 70 <= served["new"] <= 170, served  # 30% of 400, binomial sd ~9
    a.stop()
    bench.agents.remove(a)
    a2 = bench.agent()
    assert a2.server.candidate is not None and a2.server.candidate.mode == "split"
    assert a2.model_ref == "lin:1.0.0"


def test_redeploying_the_active_model_calls_off_a_split_run(bench):
    """A hub cancels an A/B run by deploying the active model again: the shortcut for
    "already active" must end the candidate too, not leave it answering requests."""
    a, (tp1, m1, w1, b1), _ = _with_candidate(bench, "split", 1.0)
    bench.deploy("dev1", "d3", tp1, m1.ref)
    assert bench.wait_for(a, "d3") == "installed"
    assert a.server.candidate is None and a.model_ref == "lin:1.0.0"
    x = ROWS[:1]
    for _ in range(20):
        np.testing.assert_allclose(a.infer({"input": x})["logits"], x @ w1 + b1, rtol=1e-5, atol=1e-5)


def test_self_test_leave_hook_runs_for_a_shadow_deployment(bench, tmp_path):
    # The leave hook runs after a state's work succeeded; a shadow or split deployment
    # succeeds at self_test by holding there (found in review: its leave hook never ran).
    hooks = tmp_path / "hooks-shadow"
    hooks.mkdir()
    log = tmp_path / "hooks.log"
    for name in ("self_test_enter", "self_test_leave"):
        (hooks / name).write_text(f'#!/bin/sh\necho "$EDGEFLEET_HOOK $EDGEFLEET_DEPLOYMENT_ID" >> {log}\n')
        (hooks / name).chmod(0o755)
    a = bench.agent(hooks_dir=hooks)
    tp1, m1, *_ = bench.bundle("1.0.0", seed=1)
    tp2, m2, *_ = bench.bundle("1.1.0", seed=2)
    bench.deploy("dev1", "d1", tp1, m1.ref)
    assert bench.wait_for(a, "d1") == "installed"
    bench.deploy("dev1", "d2", tp2, m2.ref, mode="shadow", ratio=0.5)
    assert bench.wait_for(a, "d2") == "candidate"
    assert log.read_text().splitlines() == ["enter d1", "leave d1", "enter d2", "leave d2"]
