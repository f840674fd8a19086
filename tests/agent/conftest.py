"""Fixtures of the agent tests: a real broker, a real TUF repository served over MQTT.

The hub's repository is imported only by the fixtures that build one, so that this
file also imports on the legacy device stack (``.ci/legacy-agent.sh``), where test
files that need no repository run unchanged.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import paho.mqtt.client as mqtt
import pytest

from agent import topics
from agent.config import AgentSettings
from agent.daemon import Agent
from agent.protocol import Deployment, encode
from agent.trust import TargetCustom
from tests.support import MosquittoBroker, RepoResponder, linear_bundle

if TYPE_CHECKING:
    from hub.repository import Repository, RepositoryConfig


@dataclass
class AgentBench:
    """A real broker, a real TUF repository served over MQTT, and agents under test."""

    tmp: Path
    broker: MosquittoBroker
    repo: Repository
    responder: RepoResponder
    agents: list[Agent] = field(default_factory=list)
    closers: list = field(default_factory=list)
    _n: int = 0

    def __post_init__(self) -> None:
        self.publisher = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
        self.publisher.connect("127.0.0.1", self.broker.port)
        self.publisher.loop_start()

    def bundle(self, version: str = "1.0.0", **kw) -> tuple[str, object, object, object]:
        """Build and publish a bundle; returns (target_path, manifest, W, b)."""
        self._n += 1
        path = self.tmp / f"bundle{self._n}.efb"
        man, _sha, w, b = linear_bundle(path, version=version, **kw)
        tp = self.repo.add_bundle(path, TargetCustom(
            name=man.name, version=man.version, profile=man.profile, format=man.format, precision=man.precision))
        return tp, man, w, b

    def agent(self, device_id: str = "dev1", **kw) -> Agent:
        settings = dict(broker_url=self.broker.url, device_id=device_id, profile="x86-gateway-vnni",
                        data_dir=self.tmp / device_id, telemetry_interval=0.5,
                        trust_root=self.repo.metadata_dir / "1.root.json", transfer_timeout=1.0)
        settings.update(kw)
        a = Agent(AgentSettings(**settings))
        a.start()
        self.agents.append(a)
        return a

    def deploy(self, device_id: str, deployment_id: str, target_path: str, model: str,
               health_window_s: float = 0.3, **kw) -> None:
        dep = Deployment(deployment_id=deployment_id, model=model, target_path=target_path,
                         health_window_s=health_window_s, **kw)
        self.publisher.publish(topics.device_topic(device_id, "deploy"), encode(dep), qos=1, retain=True)

    @staticmethod
    def wait_for(a: Agent, deployment_id: str, timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            rec = a.record
            if rec.deployment_id == deployment_id and rec.outcome != "idle" and rec.state.value in (
                    "committed", "rolled_back", "failed", "candidate"):
                return "rejected" if rec.rejected else rec.outcome
            time.sleep(0.05)
        raise AssertionError(f"deployment {deployment_id} did not finish: {a.record}")

    def close(self) -> None:
        for close in self.closers:
            close()
        for a in self.agents:
            a.stop()
        self.responder.stop()
        self.publisher.loop_stop()
        self.publisher.disconnect()


@pytest.fixture
def bench_factory(tmp_path: Path, mosquitto: MosquittoBroker) -> Iterator:
    from hub.repository import Repository

    benches: list[AgentBench] = []

    def make(config: RepositoryConfig | None = None, **responder_kw) -> AgentBench:
        repo = Repository(tmp_path / f"repo{len(benches)}", b"test-passphrase", config)
        repo.init()
        b = AgentBench(tmp_path, mosquitto, repo, RepoResponder(mosquitto.url, repo, **responder_kw))
        benches.append(b)
        return b

    yield make
    for b in benches:
        b.close()


@pytest.fixture
def bench(bench_factory) -> AgentBench:
    return bench_factory()
