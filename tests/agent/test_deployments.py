"""Agent deployments against a real broker and a real TUF repository.

Each refusal case checks three things: the deployment is refused with a clear error,
the agent still serves the previous model, and nothing else changed on disk.
"""

from __future__ import annotations

import time
from datetime import timedelta

import numpy as np
import pytest

from agent.trust import TargetCustom
from hub.repository import Repository, RepositoryConfig
from tests.support import owns_installed_libraries

X = np.linspace(-1, 1, 8, dtype=np.float32).reshape(2, 4)


def serves(agent, w, b) -> bool:
    got = agent.infer({"input": X})["logits"]
    return bool(np.allclose(got, X @ w + b, rtol=1e-5, atol=1e-5))


def test_install_then_upgrade_keeps_previous_slot(bench):
    a = bench.agent()
    tp1, m1, w1, b1 = bench.bundle("1.0.0", seed=1)
    bench.deploy("dev1", "d1", tp1, m1.ref)
    assert bench.wait_for(a, "d1") == "installed"
    assert serves(a, w1, b1)
    tp2, m2, w2, b2 = bench.bundle("1.1.0", seed=2)
    bench.deploy("dev1", "d2", tp2, m2.ref)
    assert bench.wait_for(a, "d2") == "installed"
    assert serves(a, w2, b2)
    st = a.status()
    assert st["model"] == "lin:1.1.0"
    assert sorted(v for v in st["slots"].values()) == ["lin:1.0.0", "lin:1.1.0"]
    assert a.record.history == ["downloading", "verifying", "installing", "self_test",
                                "activating", "health_check", "committed"]


@pytest.mark.skipif(not owns_installed_libraries(),
                    reason="the kernel pages out only files the process owns; these belong to another user")
def test_memory_is_released_at_start_and_after_a_deployment_and_the_new_model_is_warmed(bench, monkeypatch):
    import agent.daemon
    from agent.runtimes.base import LoadedModel

    warmed: list[str] = []
    real_warm = LoadedModel.warm
    monkeypatch.setattr(LoadedModel, "warm", lambda self: warmed.append(self.ref) or real_warm(self))
    monkeypatch.setattr(agent.daemon, "RELEASE_AFTER_GROWTH", 1)  # any growth: this deployment releases
    monkeypatch.setattr(agent.daemon, "RELEASE_DELAY_S", 0.1)
    a = bench.agent(release_memory=True)
    assert a.released is not None and a.released.ranges > 0  # at start
    a.released = None
    tp1, m1, w1, b1 = bench.bundle("1.0.0", seed=1)
    bench.deploy("dev1", "d1", tp1, m1.ref)
    assert bench.wait_for(a, "d1") == "installed"
    deadline = time.monotonic() + 10
    while a.released is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert a.released is not None, "no memory release after the deployment ended"
    assert warmed == [m1.ref]  # the model serving once the deployment ended (none at start)
    assert serves(a, w1, b1)
    off = bench.agent("dev2", release_memory=False)
    assert off.released is None


def test_a_deployment_that_grew_the_agent_little_releases_nothing(bench, monkeypatch):
    # A release costs the next deployment a read of its code from disk: one that did not
    # grow the agent (here: by less than the threshold, set out of reach) releases nothing.
    import agent.daemon

    monkeypatch.setattr(agent.daemon, "RELEASE_AFTER_GROWTH", 1 << 40)
    monkeypatch.setattr(agent.daemon, "RELEASE_DELAY_S", 0.05)
    a = bench.agent(release_memory=True)
    assert a.released is not None
    a.released = None
    tp1, m1, w1, b1 = bench.bundle("1.0.0", seed=1)
    bench.deploy("dev1", "d1", tp1, m1.ref)
    assert bench.wait_for(a, "d1") == "installed"
    time.sleep(0.5)  # ten times the delay
    assert a.released is None
    assert serves(a, w1, b1)


def test_deployments_in_a_run_release_memory_once_after_the_last(bench, monkeypatch):
    import agent.daemon

    monkeypatch.setattr(agent.daemon, "RELEASE_AFTER_GROWTH", 1)
    monkeypatch.setattr(agent.daemon, "RELEASE_DELAY_S", 1.5)
    a = bench.agent(release_memory=True)
    releases: list[float] = []
    real = a._release_memory
    monkeypatch.setattr(a, "_release_memory", lambda **kw: (releases.append(time.monotonic()), real(**kw)))
    ends = []
    for i, seed in enumerate((1, 2, 3)):
        tp, m, w, b = bench.bundle(f"1.0.{i}", seed=seed)
        bench.deploy("dev1", f"d{i}", tp, m.ref)
        assert bench.wait_for(a, f"d{i}") == "installed"
        ends.append(time.monotonic())
    assert releases == []  # each deployment came within the delay of the one before
    deadline = time.monotonic() + 10
    while not releases and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(releases) == 1 and releases[0] >= ends[-1] + 1.0
    assert serves(a, w, b)


def test_a_memory_release_that_fails_costs_nothing(bench, monkeypatch, caplog):
    import agent.daemon

    calls: list[int] = []

    def broken():
        calls.append(1)
        raise UnicodeDecodeError("utf-8", b"\xe9", 0, 1, "invalid continuation byte")

    monkeypatch.setattr(agent.daemon, "release_cold_pages", broken)
    monkeypatch.setattr(agent.daemon, "RELEASE_AFTER_GROWTH", 0)
    monkeypatch.setattr(agent.daemon, "RELEASE_DELAY_S", 0.05)
    a = bench.agent(release_memory=True)  # start() goes on
    assert "releasing memory failed" in caplog.text and calls == [1]
    for i, seed in enumerate((1, 2)):  # the lifecycle thread outlives the release after d0
        tp, m, w, b = bench.bundle(f"1.0.{i}", seed=seed)
        bench.deploy("dev1", f"d{i}", tp, m.ref)
        assert bench.wait_for(a, f"d{i}") == "installed"
        deadline = time.monotonic() + 5
        while len(calls) < i + 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(calls) == i + 2, "no release after the deployment"
    assert serves(a, w, b)
    assert a.record.error is None and "lifecycle_error" not in a.status()["conditions"]


def test_flipped_byte_is_refused_and_old_model_keeps_serving(bench_factory):
    flip = {"on": False}

    def mutate(path: str, offset: int, data: bytes) -> bytes:
        if flip["on"] and path.startswith("targets/") and offset == 0 and len(data) > 600:
            return data[:600] + bytes([data[600] ^ 0x01]) + data[601:]
        return data

    bench = bench_factory(mutate=mutate)
    a = bench.agent()
    tp1, m1, w1, b1 = bench.bundle("1.0.0", seed=1)
    bench.deploy("dev1", "d1", tp1, m1.ref)
    assert bench.wait_for(a, "d1") == "installed"
    flip["on"] = True
    tp2, m2, *_ = bench.bundle("1.1.0", seed=2)
    bench.deploy("dev1", "d2", tp2, m2.ref)
    assert bench.wait_for(a, "d2") == "rejected"
    assert "failed verification" in a.record.error
    assert serves(a, w1, b1)
    assert a.status()["slots"] == {"a": "lin:1.0.0", "b": None}


def test_metadata_signed_by_unknown_key_is_refused(bench_factory, tmp_path):
    bench = bench_factory()
    a = bench.agent()
    tp1, m1, w1, b1 = bench.bundle("1.0.0", seed=1)
    bench.deploy("dev1", "d1", tp1, m1.ref)
    assert bench.wait_for(a, "d1") == "installed"
    # An impostor repository with its own keys answers from now on.
    rogue = Repository(tmp_path / "rogue", b"other")
    rogue.init()
    bench.responder.repository = rogue
    tp2, m2, *_ = bench.bundle("1.1.0", seed=2)
    rogue.add_bundle(bench.repo.targets_dir / tp2, TargetCustom(
        name="lin", version="1.1.0", profile="x86-gateway-vnni", format="onnx", precision="fp32"))
    bench.deploy("dev1", "d2", tp2, m2.ref)
    assert bench.wait_for(a, "d2") == "rejected"
    assert "rejected" in a.record.error or "signature" in a.record.error.lower()
    assert serves(a, w1, b1)


def test_downgrade_needs_signed_rollback(bench):
    a = bench.agent()
    tp1, m1, w1, b1 = bench.bundle("1.0.0", seed=1)
    tp2, m2, w2, b2 = bench.bundle("2.0.0", seed=2)
    bench.deploy("dev1", "d1", tp2, m2.ref)
    assert bench.wait_for(a, "d1") == "installed"
    bench.deploy("dev1", "d2", tp1, m1.ref)
    assert bench.wait_for(a, "d2") == "rejected"
    assert a.record.error_kind == "DowngradeError"
    assert serves(a, w2, b2)
    bench.repo.set_allow_downgrade(tp1, True)
    bench.deploy("dev1", "d3", tp1, m1.ref)
    assert bench.wait_for(a, "d3") == "installed"
    assert serves(a, w1, b1)


def test_expired_metadata_is_refused_and_reported(bench_factory):
    bench = bench_factory(RepositoryConfig(timestamp_expiry=timedelta(seconds=2)))
    a = bench.agent()
    tp1, m1, w1, b1 = bench.bundle("1.0.0", seed=1)
    bench.deploy("dev1", "d1", tp1, m1.ref)
    assert bench.wait_for(a, "d1") == "installed"
    tp2, m2, *_ = bench.bundle("1.1.0", seed=2)
    time.sleep(2.5)
    bench.deploy("dev1", "d2", tp2, m2.ref)
    assert bench.wait_for(a, "d2") == "rejected"
    assert a.record.error_kind == "metadata_expired"
    assert "metadata_expired" in a.status()["conditions"]
    assert serves(a, w1, b1)
    # Fresh metadata arrives: the condition clears on the next deployment.
    bench.repo.refresh_timestamp(force=True)
    bench.deploy("dev1", "d3", tp2, m2.ref)
    assert bench.wait_for(a, "d3") == "installed"
    assert "metadata_expired" not in a.status()["conditions"]


def test_failing_selftest_is_not_activated(bench):
    a = bench.agent()
    tp1, m1, w1, b1 = bench.bundle("1.0.0", seed=1)
    bench.deploy("dev1", "d1", tp1, m1.ref)
    assert bench.wait_for(a, "d1") == "installed"
    tp2, m2, *_ = bench.bundle("1.1.0", seed=2, bad_selftest=True)
    bench.deploy("dev1", "d2", tp2, m2.ref)
    assert bench.wait_for(a, "d2") == "failed"
    assert a.record.error_kind == "selftest"
    assert serves(a, w1, b1)


def test_unloadable_model_is_not_activated(bench):
    a = bench.agent()
    tp1, m1, w1, b1 = bench.bundle("1.0.0", seed=1)
    bench.deploy("dev1", "d1", tp1, m1.ref)
    assert bench.wait_for(a, "d1") == "installed"
    tp2, m2, *_ = bench.bundle("1.1.0", seed=2, model_bytes=b"\x08\x07garbage-not-onnx")
    bench.deploy("dev1", "d2", tp2, m2.ref)
    assert bench.wait_for(a, "d2") == "failed"
    assert a.record.error_kind == "load"
    assert serves(a, w1, b1)


def test_bundle_for_another_profile_is_refused(bench):
    a = bench.agent()
    tp, m, *_ = bench.bundle("1.0.0", profile="rpi4-arm64")
    bench.deploy("dev1", "d1", tp, m.ref)
    assert bench.wait_for(a, "d1") == "rejected"
    assert a.record.error_kind == "profile"
    assert a.model_ref is None


def test_an_empty_signed_target_is_refused_and_the_old_model_keeps_serving(bench):
    a = bench.agent()
    tp, m, *_ = bench.bundle("1.0.0")
    bench.deploy("dev1", "d1", tp, m.ref)
    assert bench.wait_for(a, "d1") == "installed"
    empty = bench.tmp / "empty.efb"
    empty.write_bytes(b"")
    tp0 = bench.repo.add_bundle(empty, TargetCustom(name="lin", version="1.1.0", profile="x86-gateway-vnni",
                                                    format="onnx", precision="fp32"))
    bench.deploy("dev1", "d2", tp0, "lin:1.1.0")
    assert bench.wait_for(a, "d2") == "rejected"
    assert a.record.error_kind == "bundle" and "is empty" in (a.record.error or "")
    assert a.model_ref == "lin:1.0.0"


def test_restart_serves_committed_model_and_ignores_retained_deploy(bench):
    a = bench.agent()
    tp1, m1, w1, b1 = bench.bundle("1.0.0", seed=1)
    bench.deploy("dev1", "d1", tp1, m1.ref)
    assert bench.wait_for(a, "d1") == "installed"
    a.stop()
    bench.agents.remove(a)
    a2 = bench.agent()
    assert serves(a2, w1, b1)  # served from disk before any network
    time.sleep(1.0)  # the retained deploy arrives again
    assert a2.record.deployment_id == "d1" and a2.record.state.value == "committed"
    assert a2.record.saves == a.record.saves


def test_drift_sketches_and_telemetry_are_published(bench):
    """Served requests produce a drift sketch and a telemetry window on the broker."""
    import paho.mqtt.client as mqtt

    from agent import topics
    from agent.protocol import Telemetry, decode
    from agent.sketch import DriftSketch

    got: dict[str, list[bytes]] = {"drift": [], "telemetry": []}
    sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    sub.on_message = lambda c, u, m: got[m.topic.rsplit("/", 1)[-1]].append(m.payload)
    sub.connect("127.0.0.1", bench.broker.port)
    sub.subscribe([(topics.device_topic("dev1", "drift"), 1), (topics.device_topic("dev1", "telemetry"), 1)])
    sub.loop_start()
    a = bench.agent()
    tp1, m1, w1, b1 = bench.bundle("1.0.0", seed=1)
    bench.deploy("dev1", "d1", tp1, m1.ref)
    assert bench.wait_for(a, "d1") == "installed"
    for _ in range(50):
        a.infer({"input": X})
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not (got["drift"] and any(
            decode(Telemetry, t).inference_count > 0 for t in got["telemetry"])):
        time.sleep(0.1)
    sub.loop_stop()
    sketches = [DriftSketch.decode(d) for d in got["drift"]]
    assert sum(s.rows for s in sketches) >= 100  # 50 requests x 2 rows
    assert all(s.model == "lin:1.0.0" for s in sketches)
    tel = [decode(Telemetry, t) for t in got["telemetry"]]
    assert sum(t.inference_count for t in tel) >= 50
    assert any(t.latency.p50_ms is not None for t in tel)


def test_a_download_reports_its_progress(bench, monkeypatch):
    """A long download says it is alive (a campaign's report timeout counts from the
    last report), at most every PROGRESS_REPORT_S; here every chunk."""
    import paho.mqtt.client as mqtt

    from agent import daemon, topics
    from agent.protocol import StatusReport, decode

    monkeypatch.setattr(daemon, "PROGRESS_REPORT_S", 0.0)
    got: list[bytes] = []
    sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    sub.on_message = lambda c, u, m: got.append(m.payload)
    sub.connect("127.0.0.1", bench.broker.port)
    sub.subscribe(topics.device_topic("dev1", "status"), 1)
    sub.loop_start()
    try:
        a = bench.agent(chunk_size=64 * 1024)
        rng = np.random.default_rng(3)
        tp, man, _w, _b = bench.bundle("1.0.0", seed=3, n_in=256, n_out=512,
                                       weights=(rng.normal(size=(256, 512)).astype(np.float32), np.zeros(512, np.float32)))
        bench.deploy("dev1", "d1", tp, man.ref)
        assert bench.wait_for(a, "d1") == "installed"
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not any(b'"committed"' in g for g in got):
            time.sleep(0.05)
    finally:
        sub.loop_stop()
    reports = [decode(StatusReport, g) for g in got]
    steps = [r.progress for r in reports if r.state == "downloading" and r.progress is not None]
    assert len(steps) >= 4 and steps == sorted(steps) and 0 < steps[0] and steps[-1] == 1.0
    seqs = [r.seq for r in reports]
    assert seqs == sorted(seqs)
    # Progress reports are not retained: what the broker keeps for the device is its
    # last lifecycle report, whatever order the spool delivered them in.
    retained: list[bytes] = []
    late = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    late.on_message = lambda c, u, m: retained.append(m.payload) if m.retain else None
    late.connect("127.0.0.1", bench.broker.port)
    late.subscribe(topics.device_topic("dev1", "status"), 1)
    late.loop_start()
    try:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not retained:
            time.sleep(0.05)
    finally:
        late.loop_stop()
    final = decode(StatusReport, retained[-1])
    assert final.state == "committed" and final.progress is None


def test_a_tuf_helper_without_a_verdict_is_retried_then_fails_not_rejected(bench, tmp_path, monkeypatch):
    # A helper that crashes says nothing about the bundle: the deployment is retried as a
    # transport failure and ends "failed" (a later deployment may succeed), never "rejected".
    import sys

    a = bench.agent(max_download_attempts=2)
    tp1, m1, w1, b1 = bench.bundle("1.0.0", seed=1)
    bench.deploy("dev1", "d1", tp1, m1.ref)
    assert bench.wait_for(a, "d1") == "installed"
    python = tmp_path / "crashing-python"
    python.write_text("#!/bin/sh\necho 'MemoryError' >&2\nkill -9 $$\n")
    python.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(python))
    tp2, m2, *_ = bench.bundle("1.1.0", seed=2)
    bench.deploy("dev1", "d2", tp2, m2.ref)
    assert bench.wait_for(a, "d2") == "failed"
    assert not a.record.rejected
    assert a.record.error_kind == "transport"
    assert "after 2 attempts" in a.record.error and "exit status -9" in a.record.error
    assert "said: MemoryError" in a.record.error
    assert serves(a, w1, b1)
    monkeypatch.undo()
    bench.deploy("dev1", "d3", tp2, m2.ref)
    assert bench.wait_for(a, "d3") == "installed"
