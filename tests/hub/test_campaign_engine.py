"""The campaign engine against a real database (SQLite and PostgreSQL), with a
recording publisher and device reports fed through the fleet registry, as MQTT
ingest would; time is a controlled clock."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlmodel import select

from agent import protocol
from hub import fleet, registry
from hub.campaigns import (
    CampaignCreate,
    CampaignEngine,
    CommandRequest,
    create_campaign,
    get_campaign,
    run_command,
)
from hub.db import Database
from hub.errors import BrokerUnavailable, CommandRefused, InvalidSelector, ModelNotFound
from hub.models import AuditEntry, CampaignDevice, Device
from hub.repository import Repository
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

    def report(self, device_id: str, outcome: str, model: str, deployment_id: str) -> None:
        self.seq[device_id] = self.seq.get(device_id, 0) + 1
        with self.db.session() as s:
            fleet.apply_status(s, device_id, protocol.StatusReport(
                seq=self.seq[device_id], deployment_id=deployment_id, state="committed",
                outcome=outcome, model=model, previous_model="tiny:1.0.0"), self.clock())  # type: ignore[arg-type]

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
