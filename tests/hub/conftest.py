"""Hub test fixtures: a real database (SQLite and PostgreSQL), a real broker
(Mosquitto, or the embedded amqtt one), a hub app with its lifespan running, and
simulated devices that are plain paho clients publishing contract payloads."""

from __future__ import annotations

import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from paho.mqtt.enums import CallbackAPIVersion
from sqlalchemy.engine import make_url

from agent import protocol, topics
from hub.app import Hub, create_app
from hub.broker import EmbeddedBroker
from hub.config import HubSettings
from hub.mqtt_ingest import parse_broker_url
from tests.support import MosquittoBroker, free_port

PG_URL = os.environ.get("EDGEFLEET_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


# --------------------------------------------------------------------------- databases


@pytest.fixture(scope="session")
def pg_database() -> Iterator[str]:
    """A fresh PostgreSQL database for this test session, dropped at the end."""
    admin = sa.create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    except sa.exc.OperationalError as e:
        admin.dispose()
        pytest.skip(f"PostgreSQL not reachable at {PG_URL}: {e.orig}")
    name = f"edgefleet_hub_test_{uuid.uuid4().hex[:10]}"
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = make_url(PG_URL).set(database=name).render_as_string(hide_password=False)
    try:
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def _truncate_all(url: str) -> None:
    eng = sa.create_engine(url)
    try:
        with eng.begin() as conn:
            tables = [
                r[0]
                for r in conn.execute(
                    sa.text(
                        "SELECT tablename FROM pg_tables WHERE schemaname = 'public' "
                        "AND tablename <> 'alembic_version'"
                    )
                )
            ]
            if tables:
                conn.execute(sa.text(f"TRUNCATE {', '.join(tables)} CASCADE"))
    finally:
        eng.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'hub.db'}"
    url: str = request.getfixturevalue("pg_database")
    _truncate_all(url)
    return url


# --------------------------------------------------------------------------- brokers


@pytest.fixture(scope="session")
def session_mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MosquittoBroker]:
    """One private Mosquitto for the hub tests (device ids are unique per test)."""
    binary = shutil.which("mosquitto") or (
        "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None
    )
    if binary is None:
        pytest.fail("mosquitto is not installed; .ci/run installs it (apt-get install mosquitto)")
    broker = MosquittoBroker(binary, tmp_path_factory.mktemp("mosquitto"), free_port())
    broker.start()
    yield broker
    broker.stop()


@pytest.fixture(scope="session")
def embedded_broker() -> Iterator[EmbeddedBroker]:
    with EmbeddedBroker() as b:
        yield b


# --------------------------------------------------------------------------- the hub


def make_settings(data_dir: Path, db: str, broker_url: str | None, **kw: Any) -> HubSettings:
    return HubSettings(
        data_dir=data_dir,
        db_url=db,
        broker_url=broker_url,
        key_passphrase="test-passphrase",  # type: ignore[arg-type]
        **kw,
    )


class HubHarness:
    """A started hub app, its REST client and its parts."""

    def __init__(self, client: TestClient) -> None:
        self.client = client

    @property
    def hub(self) -> Hub:
        hub: Hub = self.client.app.state.hub  # type: ignore[attr-defined]
        return hub

    def settle(self, timeout: float = 10.0) -> None:
        """Wait until every MQTT message the hub received has been written."""
        assert self.hub.mqtt.wait_idle(timeout)


@pytest.fixture
def hub_factory(tmp_path: Path) -> Iterator[Callable[..., HubHarness]]:
    clients: list[TestClient] = []

    def start(db: str, broker_url: str | None, **kw: Any) -> HubHarness:
        settings = make_settings(tmp_path / f"hub{len(clients)}", db, broker_url, **kw)
        client = TestClient(create_app(settings))
        client.__enter__()
        clients.append(client)
        return HubHarness(client)

    yield start
    for c in reversed(clients):
        c.__exit__(None, None, None)


@pytest.fixture
def hub(hub_factory: Callable[..., HubHarness], db_url: str, session_mosquitto: MosquittoBroker) -> HubHarness:
    """A hub on the parametrized database and the session's Mosquitto."""
    return hub_factory(db_url, session_mosquitto.url)


# --------------------------------------------------------------------------- devices


class SimDevice:
    """A device simulated by a raw paho client speaking the contract's topics."""

    def __init__(self, broker_url: str, device_id: str | None = None) -> None:
        self.device_id = device_id or f"dev-{uuid.uuid4().hex[:10]}"
        self.broker_url = broker_url
        addr = parse_broker_url(broker_url)
        self.received: dict[str, list[mqtt.MQTTMessage]] = {}
        self._cond = threading.Condition()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.device_id)
        self.client.will_set(
            topics.device_topic(self.device_id, "presence"),
            protocol.encode(protocol.Presence(online=False)),
            qos=1,
            retain=True,
        )
        self.client.on_message = self._on_message
        self.client.connect(addr.host, addr.port)
        self.client.loop_start()

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        dt = topics.parse_device_topic(msg.topic)
        with self._cond:
            self.received.setdefault(dt.kind if dt else msg.topic, []).append(msg)
            self._cond.notify_all()

    def subscribe(self, kind: topics.DeviceTopicKind) -> None:
        r, _ = self.client.subscribe(topics.device_topic(self.device_id, kind), qos=1)
        assert r == mqtt.MQTT_ERR_SUCCESS
        time.sleep(0.1)

    def publish(self, kind: topics.DeviceTopicKind, payload: bytes | protocol.Payload) -> None:
        data = payload if isinstance(payload, bytes) else protocol.encode(payload)
        info = self.client.publish(
            topics.device_topic(self.device_id, kind),
            data,
            qos=topics.QOS[kind],
            retain=kind in topics.RETAINED,
        )
        if topics.QOS[kind]:
            info.wait_for_publish(5)

    def wait_for(self, kind: str, count: int = 1, timeout: float = 10.0) -> list[mqtt.MQTTMessage]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self.received.get(kind, [])) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"{self.device_id}: no {kind} message within {timeout}s")
                self._cond.wait(left)
            return list(self.received[kind])

    def hello(self, profile: str = "x86-gateway-vnni", model: str | None = None, **kw: Any) -> None:
        self.publish(
            "hello",
            protocol.Hello(
                device_id=self.device_id,
                profile=profile,
                agent_version="0.1.0",
                runtimes=kw.pop("runtimes", {"onnxruntime": "1.32.0"}),
                model=model,
                **kw,
            ),
        )

    def close(self, *, clear_retained: bool = True) -> None:
        """Disconnect, and clear this device's retained messages so later hubs don't replay them."""
        self.client.disconnect()
        self.client.loop_stop()
        if clear_retained:
            addr = parse_broker_url(self.broker_url)
            c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"{self.device_id}-cleanup")
            c.connect(addr.host, addr.port)
            c.loop_start()
            for kind in ("hello", "status", "presence", "deploy"):
                c.publish(topics.device_topic(self.device_id, kind), b"", qos=1, retain=True).wait_for_publish(5)
            c.disconnect()
            c.loop_stop()


@pytest.fixture
def device_factory() -> Iterator[Callable[[str], SimDevice]]:
    devices: list[SimDevice] = []

    def make(broker_url: str, device_id: str | None = None) -> SimDevice:
        d = SimDevice(broker_url, device_id)
        devices.append(d)
        return d

    yield make
    for d in devices:
        d.close()


def wait_until(pred: Callable[[], Any], timeout: float = 10.0, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(interval)
