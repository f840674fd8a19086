"""Fixtures of the legacy-stack tests: a real broker plus a real TUF repository.

These tests run in two environments: the main venv (numpy 2, ai-edge-litert) and
``.venv-legacy`` built by ``.ci/legacy-agent.sh`` (numpy<2, tflite-runtime 2.14, no
torch, no hub web stack). Only the agent's runtime dependencies may be imported here;
``hub.repository`` needs nothing beyond tuf, securesystemslib and cryptography.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from agent import topics
from agent.config import AgentSettings
from agent.daemon import Agent
from agent.protocol import Deployment, encode
from agent.trust import TargetCustom
from hub.repository import Repository
from tests.support import MosquittoBroker, RepoResponder


@dataclass
class DeviceBench:
    """One in-process agent, the broker it talks to, and the repository it deploys from."""

    tmp: Path
    broker: MosquittoBroker
    repo: Repository
    responder: RepoResponder
    publisher: mqtt.Client
    agents: list[Agent] = field(default_factory=list)

    def publish(self, bundle_file: Path) -> str:
        from agent.bundle import read_manifest

        man = read_manifest(bundle_file)
        return self.repo.add_bundle(bundle_file, TargetCustom(
            name=man.name, version=man.version, profile=man.profile, format=man.format,
            precision=man.precision))

    def agent(self, device_id: str = "legacy1") -> Agent:
        a = Agent(AgentSettings(
            broker_url=self.broker.url, device_id=device_id, profile="x86-gateway-vnni",
            data_dir=self.tmp / device_id, telemetry_interval=0.5,
            trust_root=self.repo.metadata_dir / "1.root.json", transfer_timeout=1.0))
        a.start()
        self.agents.append(a)
        return a

    def deploy(self, device_id: str, deployment_id: str, target_path: str, model: str) -> None:
        dep = Deployment(deployment_id=deployment_id, model=model, target_path=target_path,
                         health_window_s=0.3)
        info = self.publisher.publish(topics.device_topic(device_id, "deploy"), encode(dep), qos=1,
                                      retain=True)
        info.wait_for_publish(5)

    @staticmethod
    def wait_for(a: Agent, deployment_id: str, timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            rec = a.record
            if rec.deployment_id == deployment_id and rec.state.value in (
                    "committed", "rolled_back", "failed", "candidate"):
                return "rejected" if rec.rejected else rec.outcome
            time.sleep(0.05)
        raise AssertionError(f"deployment {deployment_id} did not finish: {a.record}")


@pytest.fixture
def device_bench(tmp_path: Path, mosquitto: MosquittoBroker) -> Iterator[DeviceBench]:
    repo = Repository(tmp_path / "repo", b"legacy-passphrase")
    repo.init()
    responder = RepoResponder(mosquitto.url, repo)
    publisher = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    publisher.connect("127.0.0.1", mosquitto.port)
    publisher.loop_start()
    bench = DeviceBench(tmp_path, mosquitto, repo, responder, publisher)
    yield bench
    for a in bench.agents:
        a.stop()
    responder.stop()
    publisher.loop_stop()
    publisher.disconnect()
