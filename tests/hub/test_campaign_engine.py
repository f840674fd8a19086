"""The campaign engine against a real database (SQLite and PostgreSQL), with a
recording publisher and device reports fed through the fleet registry, as MQTT
ingest would; time is a controlled clock."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import update
from sqlmodel import select

from agent import protocol
from hub import fleet, registry
from hub.campaigns import (
    DEFAULT_REPORT_TIMEOUT_S,
    CampaignCreate,
    CampaignEngine,
    CommandRequest,
    create_campaign,
    get_campaign,
    run_command,
)
from hub.db import Database
from hub.errors import BrokerUnavailable, CommandRefused, InvalidSelector, ModelNotFound
from hub.models import AuditEntry, Campaign, CampaignDevice, Device
from hub.repository import Repository
from hub.rollout import MAX_SAVES
from hub.telemetry import TelemetryIn, store_telemetry
from tests.hub.bundles import make_bundle


class Recorder:
    """A Publisher that records deployments; ``connected`` can be switched off."""

    def __init__(self) -> None:
        self.connected = True
        self.sent: list[tuple[str, protocol.Deployment]] = []

    def publish(self, topic: str, payload: bytes, *, qos: int, retain: bool) -> None:
        if not self.connected:
            raise BrokerUnavailable("down")
        device_id = topic.split("/")[3]
        self.sent.append((device_id, protocol.decode(protocol.Deployment, payload)))

    def publish_many(
        self, messages: Sequence[tuple[str, bytes]], *, qos: int, retain: bool
    ) -> list[BrokerUnavailable | None]:
        out: list[BrokerUnavailable | None] = []
        for topic, payload in messages:
            try:
                self.publish(topic, payload, qos=qos, retain=retain)
                out.append(None)
            except BrokerUnavailable as e:
                out.append(e)
        return out


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 3, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


class Env:
    def __init__(self, db: Database, repo: Repository) -> None:
        self.db, self.repo = db, repo
        self.pub = Recorder()
        self.clock = Clock()
        self.engine = CampaignEngine(db, repo, self.pub, health_window_s=1, clock=self.clock)
        self.seq: dict[str, int] = {}

    def hello(self, device_id: str, model: str | None = "tiny:1.0.0", tags: list[str] | None = None) -> None:
        with self.db.session() as s:
            fleet.ensure_devices(s, [device_id], self.clock())
            fleet.apply_hello(s, device_id, protocol.Hello(
                device_id=device_id, profile="x86-gateway-vnni", agent_version="t",
                runtimes={"onnxruntime": "1.32.0"}, model=model, tags=tags or []), self.clock())

    def offline(self, device_id: str) -> None:
        """The broker's last will for ``device_id``: it is offline."""
        with self.db.session() as s:
            fleet.apply_presence(s, device_id, protocol.Presence(online=False), self.clock())

    def telemetry(self, device_id: str, model: str, inferences: int, errors: int = 0,
                  p95_ms: float = 1.0) -> None:
        self.seq[device_id] = self.seq.get(device_id, 0) + 1
        t = self.clock().timestamp()
        with self.db.session() as s:
            store_telemetry(s, [TelemetryIn(device_id, protocol.Telemetry(
                seq=self.seq[device_id], window_start=t - 10, window_end=t, model=model,
                inference_count=inferences, error_count=errors,
                latency=protocol.LatencyStats(p95_ms=p95_ms)), self.clock())])

    def report(self, device_id: str, outcome: str, model: str, deployment_id: str) -> None:
        self.seq[device_id] = self.seq.get(device_id, 0) + 1
        with self.db.session() as s:
            fleet.apply_status(s, device_id, protocol.StatusReport(
                seq=self.seq[device_id], deployment_id=deployment_id, state="committed",
                outcome=outcome, model=model, previous_model="tiny:1.0.0"), self.clock())  # type: ignore[arg-type]

    def in_progress(self, device_id: str, deployment_id: str, state: str, progress: float | None = None) -> None:
        """A status report of a deployment not finished yet: a lifecycle state, with
        ``progress`` while downloading. Without ``progress`` it is also what the agent
        re-sends on every reconnect (a new seq, the same deployment and state)."""
        self.seq[device_id] = self.seq.get(device_id, 0) + 1
        with self.db.session() as s:
            fleet.apply_status(s, device_id, protocol.StatusReport(
                seq=self.seq[device_id], deployment_id=deployment_id, state=state, outcome="in_progress",
                model="tiny:1.0.0", target_model="tiny:2.0.0", progress=progress), self.clock())

    def create(self, **kw: object) -> str:
        with self.db.session() as s:
            return create_campaign(s, CampaignCreate(**{"model": "tiny:2.0.0", "select": "all", **kw}),  # type: ignore[arg-type]
                                   now=self.clock())

    def status(self, cid: str):  # type: ignore[no-untyped-def]
        with self.db.session() as s:
            return get_campaign(s, cid)

    def command(self, cid: str, cmd: str) -> bool:
        with self.db.session() as s:
            return run_command(s, cid, cmd, CommandRequest(actor="op", reason="test"), now=self.clock())

    def report_timeout(self, seconds: float) -> None:
        """Drive campaigns with an engine whose report timeout is ``seconds``."""
        self.engine = CampaignEngine(self.db, self.repo, self.pub, health_window_s=1, report_timeout_s=seconds,
                                     clock=self.clock)

    def tick(self, seconds: float = 0.0) -> None:
        self.clock.now += timedelta(seconds=seconds)
        self.engine.tick()

    def answer_all(self, outcome: str = "installed", model: str = "tiny:2.0.0") -> None:
        answered = set()
        for device_id, dep in list(self.pub.sent):
            if (device_id, dep.deployment_id) not in answered:
                answered.add((device_id, dep.deployment_id))
                with self.db.session() as s:
                    dev = s.get(Device, device_id)
                    done = dev is not None and dev.deployment_id == dep.deployment_id
                if not done:
                    self.report(device_id, outcome, dep.model if outcome == "installed" else model,
                                dep.deployment_id)


@pytest.fixture
def env(db_url: str, tmp_path: Path) -> Iterator[Env]:
    db = Database(db_url)
    db.migrate()
    repo = Repository(tmp_path / "repo", b"pw")
    repo.init()
    with db.session() as s:
        for v in ("1.0.0", "2.0.0"):
            registry.add_bundle(s, repo, make_bundle(tmp_path, version=v, seed=int(v[0])))
    yield Env(db, repo)
    db.dispose()


def test_waves_gates_and_audit(env: Env) -> None:
    for i in range(10):
        env.hello(f"d{i}")
    cid = env.create(waves="1n,50,100", soak_s=5, gates=["install_failures<=0"])
    st = env.status(cid)
    assert [w.size for w in st.waves] == [1, 4, 5]
    env.tick()
    assert [d for d, _ in env.pub.sent] == ["d0"]
    env.answer_all()
    env.tick()
    assert env.status(cid).state == "soaking"
    env.tick(4)
    assert env.status(cid).state == "soaking"
    env.tick(1.5)
    assert env.status(cid).state == "running" and env.status(cid).wave_index == 1
    env.tick()
    assert sorted(d for d, _ in env.pub.sent) == ["d0", "d1", "d2", "d3", "d4"]
    # One install fails: the count gate trips while the wave runs; on_fail=pause.
    for device_id, dep in env.pub.sent[1:]:
        env.report(device_id, "failed" if device_id == "d2" else "installed",
                   "tiny:1.0.0" if device_id == "d2" else "tiny:2.0.0", dep.deployment_id)
    env.tick()
    st = env.status(cid)
    assert st.state == "paused" and "install_failures<=0 failed: 1" in (st.reason or "")
    assert {d.device_id: d.state for d in st.devices}["d2"] == "failed"
    # Idempotent commands; resume overrides the failed wave, which then counts as passed.
    assert env.command(cid, "pause") is False
    assert env.command(cid, "resume") is True
    assert env.command(cid, "resume") is False
    env.tick()
    env.tick()
    st = env.status(cid)
    assert st.waves[1].status == "overridden" and st.wave_index == 2 and st.state == "running"
    env.tick()
    env.answer_all()
    env.tick()
    env.tick(5.1)
    st = env.status(cid)
    assert st.state == "completed", st.reason
    assert st.counts == {"updated": 9, "failed": 1}
    with env.db.session() as s:
        actions = [a.action for a in s.exec(select(AuditEntry).where(AuditEntry.campaign_id == cid)).all()]
        assert actions[0] == "rollout.create" and "rollout.resume" in actions
        assert all(d.campaign_id is None for d in s.exec(select(Device)).all())
    with pytest.raises(CommandRefused):
        env.command(cid, "pause")


def test_one_campaign_per_device_late_joiners_and_rate(env: Env) -> None:
    for i in range(4):
        env.hello(f"d{i}", tags=["eu"])
    env.hello("x0", tags=["us"])
    first = env.create(select="tag=eu", waves="100", rate_per_min=2)
    second = env.create(select="all", waves="100")
    assert {d.device_id for d in env.status(second).devices} == {"x0"}
    env.tick()
    started_first = {d for d, dep in env.pub.sent if dep.deployment_id in
                     {x.deployment_id for x in env.status(first).devices}}
    assert len(started_first) == 2  # rate limit: 2 per minute
    env.tick(30)
    assert sum(1 for d in env.status(first).devices if d.state == "deploying") == 2
    # A device announcing the eu tag mid-campaign joins the current wave.
    env.hello("d9", tags=["eu"])
    env.tick()
    st = env.status(first)
    late = {d.device_id: d for d in st.devices}["d9"]
    assert late.joined_late and late.wave == 0
    env.tick(31)
    assert sum(1 for d in env.status(first).devices if d.state == "deploying") == 4
    with env.db.session() as s:
        owners = {d.device_id: d.campaign_id for d in s.exec(select(Device)).all()}
    assert owners["x0"] == second and owners["d0"] == first


def test_publish_retried_with_the_same_deployment_id(env: Env) -> None:
    for i in range(3):
        env.hello(f"d{i}")
    cid = env.create(waves="100")
    env.pub.connected = False
    env.tick()  # recorded, not published
    with env.db.session() as s:
        rows = s.exec(select(CampaignDevice).where(CampaignDevice.campaign_id == cid)).all()
        ids = {r.device_id: r.deployment_id for r in rows}
        assert all(r.state == "deploying" and not r.published for r in rows)
    env.pub.connected = True
    env.tick()
    env.tick()
    assert sorted((d, dep.deployment_id) for d, dep in env.pub.sent) == sorted(ids.items())
    # A restarted engine (new object, same database) publishes nothing again.
    env.engine = CampaignEngine(env.db, env.repo, env.pub, clock=env.clock)
    env.tick()
    assert len(env.pub.sent) == 3


def test_rollback_sends_previous_version_and_skips_incompatible(env: Env) -> None:
    env.hello("d0")
    env.hello("d1")
    env.hello("old", model="tiny:2.0.0")  # already there: skipped, not claimed
    cid = env.create(waves="100")
    assert {d.device_id: d.state for d in env.status(cid).devices}["old"] == "skipped"
    env.tick()
    env.answer_all()
    env.tick()
    assert env.command(cid, "rollback")
    env.tick()
    rb = [dep for _, dep in env.pub.sent if dep.model == "tiny:1.0.0"]
    assert len(rb) == 2
    env.answer_all()
    env.tick()
    st = env.status(cid)
    assert st.state == "rolled_back" and st.counts == {"reverted": 2, "skipped": 1}
    assert env.command(cid, "rollback") is False


def test_bad_requests(env: Env) -> None:
    with pytest.raises(ModelNotFound):
        env.create(model="tiny:9.0.0")
    with pytest.raises(InvalidSelector):
        env.create(select="colour=red")


# --------------------------------------------------------------------------- results that never come


def _states(env: Env, cid: str) -> dict[str, str]:
    return {d.device_id: d.state for d in env.status(cid).devices}


def test_wave_none_of_whose_devices_is_online_is_held_not_passed(env: Env) -> None:
    for i in range(5):
        env.hello(f"d{i}")
    env.offline("d0")  # the canary
    cid = env.create(waves="1n,100", soak_s=0, gates=["install_failures<=0"])
    for _ in range(4):
        env.tick(1)
    st = env.status(cid)
    assert (st.state, st.wave_index, env.pub.sent) == ("running", 0, [])
    assert st.waves[0].status == "held"
    assert (st.reason or "").startswith("wave 1 held: none of its 1 devices is online")
    with env.db.session() as s:
        held = s.exec(select(AuditEntry).where(AuditEntry.campaign_id == cid,
                                               AuditEntry.action == "campaign.held")).all()
        assert len(held) == 1  # said once, not on every tick
    env.hello("d0")  # back: the canary is started and judged like any other
    env.tick()
    assert [d for d, _ in env.pub.sent] == ["d0"] and env.status(cid).waves[0].status == "running"
    env.answer_all()
    env.tick()
    env.tick()
    st = env.status(cid)
    assert st.wave_index == 1 and st.waves[0].status == "passed"


def test_started_device_without_result_blocks_its_wave_then_times_out(env: Env) -> None:
    env.report_timeout(600)
    for i in range(5):
        env.hello(f"d{i}")
    cid = env.create(waves="1n,100", soak_s=0, gates=["install_failures<=0"])
    env.tick()
    dep0 = env.pub.sent[0][1].deployment_id
    env.offline("d0")  # sent the deployment, then its last will: it never reports
    for step in (1, 1, 597):  # 599 s after the broker acknowledged it
        env.tick(step)
    st = env.status(cid)
    assert (st.state, st.wave_index, _states(env, cid)["d0"]) == ("running", 0, "deploying")
    assert [d for d, _ in env.pub.sent] == ["d0"]
    env.tick(2)  # past the report timeout: an install failure, and the gate trips
    st = env.status(cid)
    assert st.state == "paused" and _states(env, cid)["d0"] == "timed_out"
    assert "install_failures<=0 failed: 1 (1 of 1 devices so far, 1 timed out)" in (st.reason or "")
    assert [d for d, _ in env.pub.sent] == ["d0"]
    # A result that comes after all is folded in.
    env.hello("d0")
    env.report("d0", "installed", "tiny:2.0.0", dep0)
    env.tick()
    d0 = {d.device_id: d for d in env.status(cid).devices}["d0"]
    assert d0.state == "updated" and d0.detail == "reported installed after its report timed out"


def test_a_device_that_reports_progress_does_not_time_out(env: Env) -> None:
    """The report timeout measures silence: a long download that keeps reporting its
    progress is not a failure."""
    env.report_timeout(600)
    env.hello("d0")
    cid = env.create(waves="100", soak_s=0, gates=["install_failures<=0"])
    env.tick()
    dep0 = env.pub.sent[0][1].deployment_id
    def progress(value: float) -> None:
        env.seq["d0"] = env.seq.get("d0", 0) + 1
        with env.db.session() as s:
            fleet.apply_status(s, "d0", protocol.StatusReport(
                seq=env.seq["d0"], deployment_id=dep0, state="downloading", outcome="in_progress",
                progress=value), env.clock())

    for value in (0.2, 0.4, 0.6):  # 1,500 s in all, a progress report every 500 s
        env.tick(500)
        progress(value)
    env.tick(500)
    assert _states(env, cid)["d0"] == "deploying" and env.status(cid).state == "running"
    # The same progress again is no progress: a download stuck at 60% still times out.
    env.tick(50)
    progress(0.6)
    env.tick(51)  # 601 s after its last report that moved
    assert _states(env, cid)["d0"] == "timed_out"


def test_timed_out_device_without_gates_does_not_hold_the_campaign(env: Env) -> None:
    for i in range(3):
        env.hello(f"d{i}")
    cid = env.create(waves="1n,100", soak_s=0)
    env.tick()
    env.offline("d0")
    env.tick(DEFAULT_REPORT_TIMEOUT_S - 1)
    assert env.status(cid).wave_index == 0
    env.tick(2)
    env.tick()
    env.tick()
    st = env.status(cid)
    assert st.wave_index == 1 and _states(env, cid)["d0"] == "timed_out"


@pytest.mark.parametrize("timeout", [0, 1, -5, float("inf"), float("nan"), 31 * 86400])
def test_report_timeout_is_validated(env: Env, timeout: float) -> None:
    with pytest.raises(ValueError, match="report_timeout_s must be longer than the health window"):
        CampaignEngine(env.db, env.repo, env.pub, health_window_s=1, report_timeout_s=timeout)


# --------------------------------------------------------------------------- late failures


@pytest.mark.parametrize(
    ("back_during", "on_fail", "final"),
    [
        ("running", "pause", "paused"),  # a wave-1 device failing during wave 2 is gated in wave 2
        ("completing", "rollback", "rolled_back"),  # ... and while completing
    ],
)
def test_failure_reported_after_its_wave_passed_is_gated(
    env: Env, back_during: str, on_fail: str, final: str
) -> None:
    for i in range(4):
        env.hello(f"d{i}")
    env.offline("d1")  # in the canary wave with d0, but offline: it does not hold the wave
    cid = env.create(waves="2n,100", soak_s=0, gates=["install_failures<=0"], on_fail=on_fail)
    env.tick()
    env.answer_all()
    env.tick()
    env.tick()
    assert env.status(cid).wave_index == 1 and env.status(cid).waves[0].status == "passed"
    env.tick()
    assert sorted(d for d, _ in env.pub.sent) == ["d0", "d2", "d3"]
    if back_during == "completing":
        env.answer_all()
        env.tick()
        env.tick()
        assert env.status(cid).state == "completing"
    env.hello("d1")
    env.tick()
    dep1 = next(dep.deployment_id for d, dep in env.pub.sent if d == "d1")
    env.report("d1", "failed", "tiny:1.0.0", dep1)
    env.tick()
    st = env.status(cid)
    assert st.state in ("paused", "rolling_back")
    assert "install_failures<=0 failed: 1 (1 of 4 devices so far)" in (st.reason or "")
    env.answer_all()
    env.tick()
    env.answer_all(model="tiny:1.0.0")
    env.tick()
    assert env.status(cid).state == final


def _canary_fails_and_is_overridden(env: Env) -> tuple[str, str, str]:
    """Six devices, waves of 2, 4, all; d0 of the canary fails, the gate trips, the
    operator resumes (accepting d0). Returns (campaign, d1, d1's deployment)."""
    for i in range(6):
        env.hello(f"d{i}")
    cid = env.create(waves="2n,4n,100", soak_s=0, gates=["install_failures<=0"])
    env.tick()
    (d0, dep0), (d1, dep1) = [(d, dep.deployment_id) for d, dep in env.pub.sent]
    env.report(d0, "failed", "tiny:1.0.0", dep0)
    env.tick()
    assert env.status(cid).state == "paused"
    assert env.command(cid, "resume")
    return cid, d1, dep1


def test_override_accepts_the_failures_it_saw_not_later_ones(env: Env) -> None:
    cid, d1, dep1 = _canary_fails_and_is_overridden(env)
    env.report(d1, "installed", "tiny:2.0.0", dep1)
    for _ in range(3):
        env.tick()
    assert env.status(cid).wave_index == 1 and env.status(cid).state == "running"
    env.tick()
    sent = {d: dep.deployment_id for d, dep in env.pub.sent}
    env.report("d2", "installed", "tiny:2.0.0", sent["d2"])
    env.report("d3", "failed", "tiny:1.0.0", sent["d3"])  # one the operator never saw
    env.tick()
    st = env.status(cid)
    assert st.state == "paused"
    assert "install_failures<=0 failed: 1 (2 of 4 devices so far, 1 accepted by an override)" in (st.reason or "")


def _d0_times_out_and_is_accepted(env: Env, gates: list[str]) -> tuple[str, str]:
    """Four devices in a canary-then-all campaign; the canary d0 goes silent, times out,
    trips the install gate, and the operator resumes, accepting it. (campaign, d0's
    deployment id)."""
    env.report_timeout(600)
    for i in range(4):
        env.hello(f"d{i}")
    cid = env.create(waves="1n,100", soak_s=0, gates=gates)
    env.tick()
    dep0 = env.pub.sent[0][1].deployment_id
    env.offline("d0")
    env.tick(601)
    assert env.status(cid).state == "paused"
    assert env.command(cid, "resume")  # accepts d0's timeout
    return cid, dep0


def test_an_accepted_failure_that_recovers_frees_no_room_for_a_new_one(env: Env) -> None:
    """The override accepts devices, not a number: d0 timed out and was accepted, then
    installed after all; d1's later failure must still trip the gate."""
    cid, dep0 = _d0_times_out_and_is_accepted(env, ["install_failures<=0"])
    env.hello("d0")
    env.report("d0", "installed", "tiny:2.0.0", dep0)
    for _ in range(3):
        env.tick()
    sent = {d: dep.deployment_id for d, dep in env.pub.sent}
    env.report("d1", "failed", "tiny:1.0.0", sent["d1"])
    env.report("d2", "installed", "tiny:2.0.0", sent["d2"])
    env.report("d3", "installed", "tiny:2.0.0", sent["d3"])
    for _ in range(3):
        env.tick()
    st = env.status(cid)
    assert st.state == "paused" and "install_failures<=0 failed: 1" in (st.reason or "")


# --------------------------------------------------------------------------- rollback faults


def _all_updated_then_rolled_back(env: Env, n: int) -> str:
    """``n`` devices updated in one wave, then the rollback command; the campaign id."""
    for i in range(n):
        env.hello(f"d{i}")
    cid = env.create(waves="100", soak_s=0)
    env.tick()
    env.answer_all()
    env.tick()
    assert env.command(cid, "rollback")
    return cid


def _tick_without_acks_for(env: Env, device_id: str) -> None:
    """One tick during which the broker acknowledges no message to ``device_id``."""
    real = env.pub.publish_many
    mark = f"/{device_id}/"

    def publish_many(messages: Sequence[tuple[str, bytes]], *, qos: int, retain: bool
                     ) -> list[BrokerUnavailable | None]:
        out = real([m for m in messages if mark not in m[0]], qos=qos, retain=retain)
        return [BrokerUnavailable("no ack within 10s") if mark in m[0] else out.pop(0) for m in messages]

    env.pub.publish_many = publish_many  # type: ignore[method-assign]
    try:
        env.tick()
    finally:
        env.pub.publish_many = real  # type: ignore[method-assign]


def test_rollback_publish_not_acknowledged_is_retried(env: Env) -> None:
    cid = _all_updated_then_rolled_back(env, 3)
    _tick_without_acks_for(env, "d1")
    with env.db.session() as s:
        published = {cd.device_id: cd.published for cd in s.exec(select(CampaignDevice)).all()}
    assert published == {"d0": True, "d1": False, "d2": True}
    env.tick()
    assert sorted(d for d, dep in env.pub.sent if dep.model == "tiny:1.0.0") == ["d0", "d1", "d2"]
    env.answer_all()
    env.tick()
    st = env.status(cid)
    assert st.state == "rolled_back" and st.counts == {"reverted": 3}


def test_rollback_to_a_version_the_hub_lacks_fails_those_devices_only(env: Env) -> None:
    env.hello("a0", model="tiny:0.9.0")  # never uploaded to this hub
    env.hello("b0", model="tiny:1.0.0")
    cid = env.create(waves="100", on_fail="rollback")
    env.tick()
    env.answer_all()
    env.tick()
    assert env.command(cid, "rollback")
    env.tick()
    assert [(d, dep.model) for d, dep in env.pub.sent if dep.model != "tiny:2.0.0"] == [("b0", "tiny:1.0.0")]
    env.answer_all()
    env.tick()
    st = env.status(cid)
    devs = {d.device_id: d for d in st.devices}
    assert devs["a0"].state == "revert_failed"
    assert devs["a0"].detail == "cannot roll back to tiny:0.9.0: no model tiny:0.9.0"
    assert devs["b0"].state == "reverted"
    assert st.state == "rolled_back" and "1 could not be reverted" in (st.reason or "")


def test_a_rollback_does_not_wait_for_good_on_a_device_that_never_answers(env: Env) -> None:
    """A rollback cannot be aborted; a device that went away after it was sent its
    rollback must not keep the campaign in rolling_back for ever."""
    cid = _all_updated_then_rolled_back(env, 3)
    env.tick()
    env.offline("d1")
    for device_id, dep in list(env.pub.sent):
        if dep.model == "tiny:1.0.0" and device_id != "d1":
            env.report(device_id, "installed", "tiny:1.0.0", dep.deployment_id)
    env.tick()
    env.tick(DEFAULT_REPORT_TIMEOUT_S - 5)
    assert env.status(cid).state == "rolling_back"
    env.tick(10)
    env.tick()
    st = env.status(cid)
    d1 = {d.device_id: d for d in st.devices}["d1"]
    assert st.state == "rolled_back" and "1 could not be reverted" in (st.reason or "")
    assert d1.state == "revert_failed" and d1.detail.startswith("no result within 1800 s")


def test_a_rollback_is_sent_to_timed_out_devices_too(env: Env) -> None:
    """A device that timed out may still install the forward deployment the broker
    keeps for it when it comes back; the rollback must replace that message."""
    for i in range(3):
        env.hello(f"d{i}")
    cid = env.create(waves="100", gates=["install_failures<=0"], on_fail="rollback")
    env.tick()
    sent = {d: dep.deployment_id for d, dep in env.pub.sent}
    env.report("d0", "installed", "tiny:2.0.0", sent["d0"])
    env.report("d1", "installed", "tiny:2.0.0", sent["d1"])
    env.offline("d2")
    env.tick()
    env.tick(DEFAULT_REPORT_TIMEOUT_S + 1)  # d2 times out; the gate trips; rolling back
    env.tick()
    assert env.status(cid).state == "rolling_back"
    assert sorted(d for d, dep in env.pub.sent if dep.model == "tiny:1.0.0") == ["d0", "d1", "d2"]
    for d, dep in list(env.pub.sent):
        if dep.model == "tiny:1.0.0" and d != "d2":
            env.report(d, "installed", "tiny:1.0.0", dep.deployment_id)
    env.tick()
    env.tick(DEFAULT_REPORT_TIMEOUT_S + 1)
    env.tick()
    st = env.status(cid)
    assert st.state == "rolled_back" and "2 devices back" in (st.reason or "")
    assert "1 could not be reverted" in (st.reason or "") and _states(env, cid)["d2"] == "revert_failed"


def test_a_timed_out_device_s_rollback_is_signed_as_a_downgrade(env: Env) -> None:
    """The hub believes a silent device still runs the old version; if it installed the
    new one meanwhile, only a target signed as a permitted rollback brings it back."""
    from agent.trust import check_upgrade

    env.report_timeout(600)
    for i in range(3):
        env.hello(f"d{i}")
    cid = env.create(waves="1n,100", soak_s=0, gates=["install_failures<=0"], on_fail="rollback")
    env.tick()
    env.offline("d0")
    env.tick(601)
    env.tick()
    env.tick()
    assert env.status(cid).state == "rolling_back"
    (rb,) = [dep for d, dep in env.pub.sent if d == "d0" and dep.model == "tiny:1.0.0"]
    custom = env.repo.target_custom(rb.target_path)
    assert custom is not None and custom.allow_downgrade
    check_upgrade(custom, "tiny", "2.0.0")  # what the agent checks: accepted


def test_a_retried_rollback_publish_keeps_the_others_timeout(env: Env) -> None:
    """d1's rollback is published a tick after d0's; d0's silence is counted from its own."""
    env.report_timeout(600)
    cid = _all_updated_then_rolled_back(env, 2)
    _tick_without_acks_for(env, "d1")  # d0's rollback reaches the broker; d1's does not
    env.tick(500)  # d1's now
    env.tick(101)  # d0 silent 601 s
    assert _states(env, cid)["d0"] == "revert_failed" and _states(env, cid)["d1"] == "reverting"


def test_an_override_saved_before_devices_were_recorded_is_kept(env: Env) -> None:
    """A campaign overridden by the previous hub version (no accepted_failures in its
    wave results) must not trip again on the failure the operator accepted."""
    cid, d1, dep1 = _canary_fails_and_is_overridden(env)
    with env.db.session() as s:
        c = s.get(Campaign, cid)
        assert c is not None
        res = [dict(r) for r in c.wave_results]
        del res[0]["accepted_failures"]
        c.wave_results = res
        s.add(c)
        s.commit()
    env.report(d1, "installed", "tiny:2.0.0", dep1)
    for _ in range(4):
        env.tick()
    st = env.status(cid)
    assert st.state == "running" and st.wave_index >= 1, st.reason


def test_rolling_back_a_finished_campaign_leaves_devices_another_one_owns(env: Env) -> None:
    env.report_timeout(600)
    env.hello("d0")
    env.hello("d1")
    a = env.create(waves="100", soak_s=0)
    env.tick()
    sent = {d: dep.deployment_id for d, dep in env.pub.sent}
    env.report("d0", "installed", "tiny:2.0.0", sent["d0"])
    env.offline("d1")
    env.tick(601)  # d1 times out
    for _ in range(3):
        env.tick()
    assert env.status(a).state == "completed"
    env.hello("d1")
    b = env.create(select="id=d1", soak_s=0)  # d1 now belongs to campaign b
    env.tick()
    n = len(env.pub.sent)
    assert env.command(a, "rollback")
    env.tick()
    env.tick()
    assert [d for d, _ in env.pub.sent[n:]] == ["d0"]
    d1 = {d.device_id: d for d in env.status(a).devices}["d1"]
    assert d1.state == "revert_failed" and "another active campaign" in (d1.detail or "")
    with env.db.session() as s:
        dev = s.get(Device, "d1")
        assert dev is not None and dev.campaign_id == b


def test_rollback_at_the_save_cap_still_finishes(env: Env) -> None:
    env.hello("d0")
    cid = env.create(waves="100")
    env.tick()
    env.answer_all()
    env.tick()
    with env.db.session() as s:
        c = s.get(Campaign, cid)
        assert c is not None
        c.saves = MAX_SAVES - 1
        s.add(c)
    assert env.command(cid, "rollback")  # the last save under the cap
    env.tick()
    env.answer_all()
    env.tick()  # reverted: a move into a terminal state is never replaced by "looped"
    assert env.status(cid).state == "rolled_back"


def test_rollback_of_more_devices_than_one_deployment_takes(env: Env) -> None:
    n = 10_001
    with env.db.session() as s:
        fleet.ensure_devices(s, [f"d{i:05d}" for i in range(n)], env.clock())
        s.execute(update(Device).values(profile="x86-gateway-vnni", runtimes={"onnxruntime": "1.32.0"},
                                        model="tiny:1.0.0", online=True))
    cid = env.create(waves="100")
    with env.db.session() as s:  # as if every device had installed 2.0.0
        s.execute(update(CampaignDevice).values(state="updated", started=env.clock()))
        s.execute(update(Device).values(model="tiny:2.0.0"))
    assert env.command(cid, "rollback")
    env.tick()
    with env.db.session() as s:
        rows = s.exec(select(CampaignDevice.rollback_deployment_id, CampaignDevice.state,
                             CampaignDevice.published)).all()
    assert {(st, pub) for _, st, pub in rows} == {("reverting", True)}
    assert sorted(Counter(rb for rb, _, _ in rows).values()) == [1, 10_000]
    assert len({d for d, dep in env.pub.sent if dep.model == "tiny:1.0.0"}) == n


# --------------------------------------------------------------------------- late and repeated reports


def test_a_status_repeated_on_reconnect_does_not_restart_the_report_timeout(env: Env) -> None:
    """Only progress restarts the report timeout: a new lifecycle state or a download
    progress report. The status an agent re-sends on every reconnect (same deployment,
    same state, a new seq) is not progress, so a device stuck in one state that keeps
    reconnecting still times out, one timeout after its last progress."""
    env.report_timeout(600)
    env.hello("d0")
    cid = env.create(waves="100", soak_s=0, gates=["install_failures<=0"])
    env.tick()
    dep0 = env.pub.sent[0][1].deployment_id
    env.tick(10)
    env.in_progress("d0", dep0, "downloading", progress=0.2)  # progress: the timer restarts
    env.tick(290)
    env.hello("d0")
    env.in_progress("d0", dep0, "downloading")  # a reconnect: the same state again
    env.tick(100)
    env.in_progress("d0", dep0, "verifying")  # a new state: the timer restarts (at 400 s)
    for _ in range(5):  # reconnects every 100 s, each re-sending "verifying"
        env.tick(100)
        env.hello("d0")
        env.in_progress("d0", dep0, "verifying")
    env.tick(99)  # 599 s after "verifying" was first reported
    assert _states(env, cid)["d0"] == "deploying"
    env.tick(2)
    assert _states(env, cid)["d0"] == "timed_out"
    assert env.status(cid).state == "paused"


def test_a_restarted_hub_gives_a_repeating_device_one_more_timeout_at_most(env: Env) -> None:
    """The state a device's timer last restarted on is not saved: a restarted engine
    takes the first report it sees as progress, once, then times the device out."""
    env.report_timeout(600)
    env.hello("d0")
    cid = env.create(waves="100", soak_s=0)
    env.tick()
    dep0 = env.pub.sent[0][1].deployment_id
    env.tick(10)
    env.in_progress("d0", dep0, "downloading", progress=0.2)
    env.tick(290)
    env.in_progress("d0", dep0, "downloading")  # a reconnect, at 300 s
    env.report_timeout(600)  # the hub restarts: a new engine, same database
    for _ in range(5):  # reconnects every 100 s, up to 800 s
        env.tick(100)
        env.in_progress("d0", dep0, "downloading")
    env.tick(99)  # 599 s after the repeat (at 300 s) the new engine took as progress
    assert _states(env, cid)["d0"] == "deploying"
    env.tick(2)
    assert _states(env, cid)["d0"] == "timed_out"


@pytest.mark.parametrize("finished", [False, True], ids=["while_rolling_back", "after_rolled_back"])
def test_a_rollback_result_after_its_timeout_is_folded_in(env: Env, finished: bool) -> None:
    """A device whose rollback timed out (``revert_failed``) and that reports later it
    did roll back is ``reverted``, as a forward result after ``timed_out`` is folded
    in: while the campaign still rolls back, and after it ended ``rolled_back``."""
    env.report_timeout(600)
    cid = _all_updated_then_rolled_back(env, 3)
    _tick_without_acks_for(env, "d2")  # d0's and d1's rollbacks reach the broker now
    env.tick(300)  # d2's 300 s later
    rb = {d: dep.deployment_id for d, dep in env.pub.sent if dep.model == "tiny:1.0.0"}
    env.offline("d1")
    env.report("d0", "installed", "tiny:1.0.0", rb["d0"])
    if finished:
        env.report("d2", "installed", "tiny:1.0.0", rb["d2"])
    env.tick(301)  # d1 silent 601 s
    assert _states(env, cid)["d1"] == "revert_failed"
    assert env.status(cid).state == ("rolled_back" if finished else "rolling_back")
    env.hello("d1", model="tiny:1.0.0")
    env.report("d1", "installed", "tiny:1.0.0", rb["d1"])
    env.tick()
    d1 = {d.device_id: d for d in env.status(cid).devices}["d1"]
    assert d1.state == "reverted"
    assert d1.detail == ("reported installed after it was marked revert_failed (no result within 600 s of its "
                         "deployment reaching the broker or of its last report of progress)")
    if not finished:
        env.report("d2", "installed", "tiny:1.0.0", rb["d2"])
        env.tick()
    st = env.status(cid)
    assert st.state == "rolled_back" and st.counts == {"reverted": 3}
    assert st.reason == "3 devices back on their previous version"
    with env.db.session() as s:
        late = s.exec(select(AuditEntry).where(AuditEntry.action == "campaign.reverted_late")).all()
    assert [e.detail["devices"] for e in late] == [["d1"]]


def test_an_accepted_timeout_that_reports_rolled_back_is_a_health_failure(env: Env) -> None:
    """d0 times out, the install gate trips and the operator resumes, accepting d0's
    timeout. d0 then reports that its agent rolled back after its health window: the
    operator accepted a silent device, not an unhealthy model, so the health gate
    trips; d0 no longer counts as an install failure."""
    cid, dep0 = _d0_times_out_and_is_accepted(env, ["install_failures<=0", "health_failures<=0"])
    for _ in range(3):
        env.tick()
    st = env.status(cid)
    assert (st.state, st.wave_index) == ("running", 1)
    env.hello("d0")
    env.report("d0", "rolled_back", "tiny:1.0.0", dep0)
    env.tick()
    st = env.status(cid)
    assert _states(env, cid)["d0"] == "health_failed"
    assert st.state == "paused"
    assert "health_failures<=0 failed: 1" in (st.reason or "")
    assert "install_failures" not in (st.reason or "")


# --------------------------------------------------------------------------- small samples


@pytest.mark.parametrize(
    ("gate", "inferences", "errors", "new_p95", "want"),
    [
        ("error_rate<=0.01", 1, 1, 1.0, "passed"),  # one inference: not enough data
        ("error_rate<=0.01", 199, 199, 1.0, "passed"),
        ("error_rate<=0.01", 300, 30, 1.0, "paused"),
        ("error_rate<=0.01 min=1", 1, 1, 1.0, "paused"),
        ("p95_regression<=1.2", 1, 0, 5.0, "passed"),
        ("p95_regression<=1.2", 300, 0, 5.0, "paused"),
        ("p95_regression<=1.2 min=1", 1, 0, 5.0, "paused"),
    ],
)
def test_quality_gates_need_a_minimum_sample(
    env: Env, gate: str, inferences: int, errors: int, new_p95: float, want: str
) -> None:
    for i in range(4):
        env.hello(f"d{i}")
    env.telemetry("d0", "tiny:1.0.0", inferences, p95_ms=1.0)  # the old version's baseline
    env.tick(1)
    cid = env.create(waves="1n,100", soak_s=60, gates=[gate])
    env.tick()
    env.answer_all()
    env.tick()
    assert env.status(cid).state == "soaking"
    env.telemetry("d0", "tiny:2.0.0", inferences, errors, p95_ms=new_p95)
    env.tick(61)
    st = env.status(cid)
    verdict = st.waves[0].verdicts[0]
    if want == "passed":
        assert st.wave_index == 1 and st.waves[0].status == "passed"
        assert verdict["value"] is None and verdict["note"].startswith(f"not enough data: {inferences} inferences")
        with env.db.session() as s:
            reasons = s.exec(select(AuditEntry.reason).where(AuditEntry.campaign_id == cid,
                                                             AuditEntry.action == "campaign.transition")).all()
        assert f"wave 1 passed its gates; no or not enough data for {gate}" in reasons
    else:
        assert st.state == "paused" and verdict["passed"] is False
