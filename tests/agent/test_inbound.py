"""Hostile MQTT input to a running agent: counted, logged, never fatal."""

from __future__ import annotations

import time

import numpy as np

from agent import topics


def test_malformed_deploy_messages_are_counted_and_agent_keeps_serving(bench):
    a = bench.agent()
    tp1, m1, w1, b1 = bench.bundle("1.0.0", seed=1)
    bench.deploy("dev1", "d1", tp1, m1.ref)
    assert bench.wait_for(a, "d1") == "installed"
    t = topics.device_topic("dev1", "deploy")
    for payload in (b"garbage", b'{"v":1,"deployment_id":', b'{"v":7,"x":1}', b"{" * 300_000, b'{"v":1}'):
        bench.publisher.publish(t, payload, qos=1).wait_for_publish(5)
    # Garbage on the repo/data topic too.
    bench.publisher.publish(topics.device_topic("dev1", "repo/data"), b"EFC1\x00\x00\x00\xff{}", qos=0)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and (
            sum(a.payload_errors.snapshot().values()) < 5 or a.repo.frames_rejected < 1):
        time.sleep(0.05)
    assert a.payload_errors.snapshot() == {"not_json": 2, "version": 1, "oversized": 1, "schema": 1}
    assert a.repo.frames_rejected == 1
    x = np.ones((1, 4), np.float32)
    np.testing.assert_allclose(a.infer({"input": x})["logits"], x @ w1 + b1, rtol=1e-5)
    assert a.record.deployment_id == "d1"
