"""What a device serves after a restart that follows a fault, and faults that must not end
the lifecycle or the shadow comparison (found in review: each failed before its fix)."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from agent.lifecycle import State
from agent.runtimes.base import LoadedModel
from agent.serving import ModelServer


def _restart(bench, a, device_id: str, **kw):
    a.stop()
    bench.agents.remove(a)
    return bench.agent(device_id, **kw)


def _served_then_stopped(bench, device_id: str):
    """An agent that installed v1.0.0 and was stopped: ``(agent, manifest)``."""
    tp, man, *_ = bench.bundle("1.0.0")
    a = bench.agent(device_id)
    bench.deploy(device_id, "d1", tp, man.ref)
    assert bench.wait_for(a, "d1") == "installed"
    a.stop()
    bench.agents.remove(a)
    return a, man


def test_a_failed_first_deployment_is_not_served_after_a_restart(bench):
    """The first deployment fails its self-test: its model stays in slot a, the pointer
    says "none", and the next start must serve nothing rather than that model."""
    tp, man, *_ = bench.bundle("1.0.0", bad_selftest=True)
    a = bench.agent("first-fails")
    bench.deploy("first-fails", "d1", tp, man.ref)
    assert bench.wait_for(a, "d1") in ("failed", "rejected")
    assert a.server.active is None
    a = _restart(bench, a, "first-fails")
    assert a.server.active is None
    assert a.model_ref is None


def test_an_unreadable_state_record_keeps_the_device_serving(bench):
    a, man = _served_then_stopped(bench, "torn-state")
    state = a.settings.data_dir / "state.json"
    state.write_text('{"state": "committed", "saves": "x"}')  # what a newer agent or a bad disk might leave
    from agent.config import AgentSettings
    from agent.daemon import Agent

    loaded = Agent(AgentSettings(**{**a.settings.model_dump(), "device_id": "torn-state"}))
    assert loaded.record.state == State.FAILED and "unreadable" in (loaded.record.error or "")
    loaded.spool.close()
    a = bench.agent("torn-state")
    assert a.model_ref == man.ref  # still serving what the pointer names
    [aside] = state.parent.glob("state.json.unreadable-*")
    assert aside.read_text().startswith('{"state": "committed"')
    out = a.infer({"input": np.ones((1, 4), np.float32)})
    assert out["logits"].shape == (1, 3)


def test_an_unexpected_error_fails_the_deployment_and_the_next_one_still_runs(bench, monkeypatch):
    """A fault no state foresaw (here: the self-test raising something other than its own
    error) fails that deployment; the lifecycle thread lives on and takes the next one."""
    import agent.daemon as daemon

    tp1, m1, *_ = bench.bundle("1.0.0")
    tp2, m2, *_ = bench.bundle("1.1.0", seed=2)
    a = bench.agent("unforeseen")
    real = daemon.run_selftest
    calls = {"n": 0}

    def flaky(model):
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyError("something no state expects")
        return real(model)

    monkeypatch.setattr(daemon, "run_selftest", flaky)
    bench.deploy("unforeseen", "d1", tp1, m1.ref)
    assert bench.wait_for(a, "d1") == "failed"
    assert a.record.error_kind == "internal" and "KeyError" in (a.record.error or "")
    bench.deploy("unforeseen", "d2", tp2, m2.ref)
    assert bench.wait_for(a, "d2") == "installed"
    assert a.model_ref == m2.ref


class _Raising:
    """A runtime whose every call raises what ONNX Runtime raises for a failed kernel."""

    def infer(self, inputs):
        raise RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION")

    def unload(self) -> None:
        pass


class _Scalar:
    def infer(self, inputs):
        return {"y": np.float32(1.0)}  # a 0-d output

    def unload(self) -> None:
        pass


def _stub(bundle, runtime, slot="b") -> LoadedModel:
    return LoadedModel(bundle, runtime, slot)  # type: ignore[arg-type]


def test_shadow_and_split_survive_a_candidate_that_raises(bench):
    tp, man, *_ = bench.bundle("1.0.0")
    a = bench.agent("shadow-raise")
    bench.deploy("shadow-raise", "d1", tp, man.ref)
    assert bench.wait_for(a, "d1") == "installed"
    active = a.server.active
    x = {"input": np.ones((1, 4), np.float32)}

    server = ModelServer()
    server.swap(active)
    server.set_candidate(_stub(active.bundle, _Raising()), "shadow", 1.0)
    for _ in range(20):
        server.infer(x)
    deadline = time.monotonic() + 5
    while server.candidate.window.peek()[1] < 20 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.candidate.window.peek() == (20, 20)  # every mirrored request counted as an error
    assert server._shadow_thread is not None and server._shadow_thread.is_alive()

    server.set_candidate(_stub(active.bundle, _Scalar()), "shadow", 1.0)  # odd output shapes
    for _ in range(5):
        server.infer(x)
    server.set_candidate(_stub(active.bundle, _Raising()), "shadow", 1.0)
    server.infer(x)
    deadline = time.monotonic() + 5
    while server.candidate.window.peek()[0] < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server._shadow_thread.is_alive() and server.candidate.window.peek() == (1, 1)

    server.set_candidate(_stub(active.bundle, _Raising()), "split", 1.0)
    out, served_by = server.infer(x)  # the candidate fails; the active model answers
    assert served_by is active and out["logits"].shape == (1, 3)
    assert server.candidate.window.peek() == (1, 1)


def test_status_of_a_device_with_an_unreadable_record_moves_nothing(tmp_path):
    """``edgefleet agent status`` reads; only the daemon sets an unreadable record aside."""
    from agent.daemon import status_from_disk

    (tmp_path / "state.json").write_text("{torn")
    st = status_from_disk(tmp_path)
    assert st["state"] == "failed" and "unreadable" in st["last_error"]
    assert (tmp_path / "state.json").read_text() == "{torn"
    assert not list(tmp_path.glob("state.json.unreadable*"))
    assert json.loads(json.dumps(st))["slots"] == {"a": None, "b": None}


def test_an_unreadable_spool_is_set_aside_and_the_agent_starts(bench):
    a, man = _served_then_stopped(bench, "bad-spool")
    spool = a.settings.data_dir / "spool.sqlite"
    for p in spool.parent.glob("spool.sqlite-*"):
        p.unlink()
    spool.write_bytes(b"this is not a database" * 100)
    from agent.daemon import status_from_disk

    st = status_from_disk(a.settings.data_dir)  # a reader reports it and moves nothing
    assert "unreadable" in st["spool_error"] and spool.read_bytes().startswith(b"this is not")
    a = bench.agent("bad-spool")
    assert a.model_ref == man.ref
    assert "spool_reset" in a._conditions
    assert list(spool.parent.glob("spool.sqlite.unreadable-*"))
    assert a.spool.next_seq("seq.status") > 1_700_000_000_000  # above anything the hub saw


def test_spool_byte_count_follows_a_failed_push(tmp_path):
    import sqlite3

    import pytest

    from agent.spool import Priority, Spool

    sp = Spool(tmp_path / "s.sqlite", max_bytes=10_000)
    sp.push(Priority.METRICS, "t", b"x" * 1000)
    before = sp.size_bytes()
    # The insert succeeds; evicting the first record to make room fails.
    sp._db.execute("CREATE TRIGGER no_delete BEFORE DELETE ON records BEGIN SELECT RAISE(ABORT, 'disk full'); END")
    with pytest.raises(sqlite3.IntegrityError):
        sp.push(Priority.METRICS, "t", b"y" * 9500)
    assert sp.size_bytes() == before and len(sp) == 1
    first = sp.next_seq("seq.x")
    assert sp.next_seq("seq.x") == first + 1
    sp.close()
    again = Spool(tmp_path / "s.sqlite")
    assert again.next_seq("seq.x") >= first + 2  # survives a restart, never goes back
    # A power cut that loses the last commits (synchronous=NORMAL) must not make the next
    # number one the hub has seen: at start, seq counters move up to the clock.
    again._db.execute("UPDATE counters SET value = 5 WHERE name = 'seq.x'")
    again.close()
    assert Spool(tmp_path / "s.sqlite").next_seq("seq.x") > first


def test_seq_catches_up_with_a_clock_set_late_and_a_new_spool_has_a_new_epoch(tmp_path, monkeypatch):
    """A board without a real-time clock boots near 1970; NTP sets the clock later. The
    numbers must jump to the clock then, not count on from 1970 until a restart."""
    from types import SimpleNamespace

    from agent import spool as spool_mod
    from agent.spool import Spool

    now = [100.0]
    monkeypatch.setattr(spool_mod, "time", SimpleNamespace(time=lambda: now[0]))
    sp = Spool(tmp_path / "s.sqlite")
    assert [sp.next_seq("seq.x") for _ in range(3)] == [100_000, 100_001, 100_002]
    now[0] = 1_800_000_000.0  # NTP
    assert sp.next_seq("seq.x") == 1_800_000_000_000
    assert sp.next_seq("seq.x") == 1_800_000_000_001  # faster than the clock: still increasing
    epoch = sp.epoch
    assert epoch is not None and epoch == Spool(tmp_path / "s.sqlite", set_aside=False).epoch
    sp.close()
    now[0] = 100.0  # the clock is wrong again after a restart: numbers never go back
    again = Spool(tmp_path / "s.sqlite")
    assert again.epoch == epoch and again.next_seq("seq.x") == 1_800_000_000_002
    again.close()
    fresh = Spool(tmp_path / "other.sqlite")
    assert fresh.epoch not in (None, epoch)


def test_an_installed_slot_is_on_disk_before_it_is_renamed_into_place(tmp_path, monkeypatch):
    """A power cut after the rename must not find a slot of empty files: every unpacked
    file and the staging folder are flushed first, the slots folder after."""
    import hashlib
    import os

    from agent import slots as slots_mod
    from agent.slots import Slots
    from tests.support import linear_bundle

    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(dst)))
        return real_replace(src, dst)

    f = tmp_path / "b.efb"
    linear_bundle(f)
    s = Slots(tmp_path / "slots")
    monkeypatch.setattr(slots_mod.os, "fsync", fsync)
    monkeypatch.setattr(slots_mod.os, "replace", replace)
    s.install(f, "a", sha256=hashlib.sha256(f.read_bytes()).hexdigest())
    at = events.index(("replace", str(s.path("a"))))
    before = {path.rsplit("/", 1)[-1] for kind, path in events[:at] if kind == "fsync"}
    assert {p.name for p in s.path("a").iterdir()} <= before  # every file of the slot
    assert any(n.startswith(".staging-a-") for n in before)  # and the folder that held them
    assert events[at + 1:] == [("fsync", str(s.root))]


def test_a_torn_pointer_serves_the_slot_the_record_committed(bench):
    """1.0.0 in slot a, then 1.1.0 committed in slot b; the pointer is then torn. The
    agent must come back on 1.1.0, not fall back to the older slot."""
    tp1, m1, *_ = bench.bundle("1.0.0")
    tp2, m2, *_ = bench.bundle("1.1.0", seed=2)
    a = bench.agent("torn-pointer")
    bench.deploy("torn-pointer", "d1", tp1, m1.ref)
    assert bench.wait_for(a, "d1") == "installed"
    bench.deploy("torn-pointer", "d2", tp2, m2.ref)
    assert bench.wait_for(a, "d2") == "installed"
    assert a.server.active.slot == "b"
    a.stop()
    bench.agents.remove(a)
    (a.settings.data_dir / "slots" / "pointer.json").write_text('{"act')
    a = bench.agent("torn-pointer")
    assert a.model_ref == m2.ref and a.slots.pointer() == "b"


def test_a_locked_spool_is_not_mistaken_for_a_damaged_one(tmp_path):
    """Only "not a database" or "corrupt" sets the file aside: a lock held by another
    process is an error of the moment, and the records must survive it."""
    import sqlite3

    from agent.spool import Priority, Spool

    path = tmp_path / "spool.sqlite"
    sp = Spool(path)
    sp.push(Priority.STATUS, "t", b"keep me")
    sp.close()
    other = sqlite3.connect(str(path), isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    try:
        locked = Spool(path)
        assert locked.reset_reason is None
    finally:
        other.execute("ROLLBACK")
        other.close()
    locked.close()
    again = Spool(path)
    assert again.reset_reason is None and len(again) == 1
    assert not list(tmp_path.glob("spool.sqlite.unreadable-*"))
    again.close()
    # The lock above is absorbed before it reaches the check; the check itself, on the
    # errors SQLite raises for a held lock and for a file that is not a database:
    from agent.spool import _damaged

    holder = sqlite3.connect(str(path), isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(sqlite3.OperationalError) as busy:
            sqlite3.connect(str(path), timeout=0).execute("INSERT INTO counters VALUES ('x', 1)")
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert not _damaged(busy.value)
    garbage = tmp_path / "garbage.sqlite"
    garbage.write_bytes(b"not a database " * 512)
    with pytest.raises(sqlite3.DatabaseError) as notadb:
        sqlite3.connect(str(garbage)).execute("SELECT * FROM sqlite_master")
    assert _damaged(notadb.value)


def _stopped_in_health_check(bench, device_id: str):
    """v1.0.0 committed, then v1.1.0 live in its health window when the agent stopped:
    ``(agent, v1 manifest, v2 manifest)``."""
    tp1, m1, *_ = bench.bundle("1.0.0")
    tp2, m2, *_ = bench.bundle("1.1.0", seed=2)
    a = bench.agent(device_id)
    bench.deploy(device_id, "d1", tp1, m1.ref)
    assert bench.wait_for(a, "d1") == "installed"
    bench.deploy(device_id, "d2", tp2, m2.ref, health_window_s=60)
    deadline = time.monotonic() + 30
    while a.record.state != State.HEALTH_CHECK and time.monotonic() < deadline:
        time.sleep(0.05)
    assert a.record.state == State.HEALTH_CHECK and a.model_ref == m2.ref
    a.stop()
    bench.agents.remove(a)
    return a, m1, m2


def _saved(a, **fields) -> None:
    st = a.settings.data_dir / "state.json"
    st.write_text(json.dumps({**json.loads(st.read_text()), **fields}))


@pytest.mark.parametrize("saved_state", ["health_check", "rolling_back"])
def test_a_crash_loop_at_the_save_cap_still_rolls_back(bench, saved_state):
    # A device that crash-looped to the cap while the new model was live: giving up must
    # not leave the unproven model serving (found in review: it ended "failed" on v1.1.0).
    from agent.lifecycle import MAX_SAVES_PER_DEPLOYMENT

    dev = f"cap-{saved_state}"
    a, m1, _ = _stopped_in_health_check(bench, dev)
    _saved(a, state=saved_state, saves=MAX_SAVES_PER_DEPLOYMENT)
    b = bench.agent(dev)
    assert bench.wait_for(b, "d2") == "rolled_back"
    assert b.record.error_kind == "loop"
    assert b.model_ref == m1.ref
    assert json.loads((b.settings.data_dir / "slots" / "pointer.json").read_text())["active"] == b.record.from_slot


def test_a_restart_that_will_roll_back_never_serves_the_unproven_model(bench):
    # Even when the rollback itself has used up its saves (it kept crashing the agent),
    # the start serves the previous model, not the one that may be bringing it down.
    from agent.lifecycle import MAX_SAVES_PER_DEPLOYMENT, ROLLBACK_SAVES_PAST_CAP

    a, m1, m2 = _stopped_in_health_check(bench, "boot-rollback")
    _saved(a, state="rolling_back", saves=MAX_SAVES_PER_DEPLOYMENT + ROLLBACK_SAVES_PAST_CAP)
    b = bench.agent("boot-rollback")
    assert bench.wait_for(b, "d2") == "failed"
    assert b.model_ref == m1.ref
    assert b.status()["slots"][b.record.from_slot] == m1.ref


def test_a_stop_during_a_leave_hook_lets_it_finish(bench, tmp_path):
    # The leave hook of a health check that passed: cutting it off would leave the state
    # saved as health_check, and the next start would roll back a model that passed
    # (found in review).
    hooks = tmp_path / "hooks-leave"
    hooks.mkdir()
    started = tmp_path / "leave-started"
    (hooks / "health_check_leave").write_text(f"#!/bin/sh\ntouch {started}\nsleep 1\n")
    (hooks / "health_check_leave").chmod(0o755)
    tp, man, *_ = bench.bundle("1.0.0")
    a = bench.agent("leave-stop", hooks_dir=hooks)
    bench.deploy("leave-stop", "d1", tp, man.ref, health_window_s=0)
    deadline = time.monotonic() + 30
    while not started.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert started.exists()
    a.stop()
    bench.agents.remove(a)
    saved = json.loads((a.settings.data_dir / "state.json").read_text())
    assert saved["state"] == "committed", saved
