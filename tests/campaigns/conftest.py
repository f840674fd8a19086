"""Campaign acceptance fixtures: a real Mosquitto, a real hub process (SQLite or
PostgreSQL), real bundles of a tiny linear model, and 50 simulated devices running
the real agent (:mod:`hub.sim`)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from hub.localfleet import HubProcess, wait_until
from hub.sim import SimConfig, SimFleet
from tests.hub.conftest import _truncate_all, pg_database  # noqa: F401  (fixture re-export)
from tests.support import linear_bundle

PROFILE = "x86-gateway-vnni"
N_DEVICES = 50


@dataclass(frozen=True)
class Models:
    v1: Path  # lin:1.0.0, preinstalled on every device
    v2: Path  # lin:2.0.0, the same weights: predictions unchanged
    v3: Path  # lin:3.0.0, a bias that sends most predictions to class 0


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> Models:
    d = tmp_path_factory.mktemp("bundles")
    rng = np.random.default_rng(7)
    w = rng.normal(size=(4, 3)).astype(np.float32)
    b = np.zeros(3, dtype=np.float32)
    shifted = np.array([6.0, 0.0, 0.0], dtype=np.float32)
    paths = []
    for version, bias in (("1.0.0", b), ("2.0.0", b), ("3.0.0", shifted)):
        p = d / f"lin-{version}.efb"
        linear_bundle(p, version=version, profile=PROFILE, weights=(w, bias))
        paths.append(p)
    return Models(*paths)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Every acceptance test runs on SQLite; those without ``sqlite_only`` also on PostgreSQL."""
    if "hub_db" in metafunc.fixturenames:
        params: list[Any] = ["sqlite"]
        if "sqlite_only" not in metafunc.fixturenames:
            params.append(pytest.param("postgresql", marks=pytest.mark.postgres))
        metafunc.parametrize("hub_db", params, indirect=True)


@pytest.fixture
def hub_db(request: pytest.FixtureRequest) -> str | None:
    if request.param == "sqlite":
        return None
    url: str = request.getfixturevalue("pg_database")
    _truncate_all(url)
    return url


@pytest.fixture
def sqlite_only() -> None:
    """Marks a test to run on SQLite only (see pytest_generate_tests)."""


class Fleet:
    """The hub process, its REST client and the simulated devices of one test."""

    def __init__(self, hub: HubProcess, sim: SimFleet, models: Models) -> None:
        self.hub = hub
        self.sim = sim
        self.models = models
        self.http = httpx.Client(base_url=hub.url, timeout=30)

    def reconnect(self) -> None:
        self.http.close()
        self.http = httpx.Client(base_url=self.hub.url, timeout=30)

    def upload(self, *paths: Path) -> None:
        for p in paths:
            with open(p, "rb") as fh:
                r = self.http.post("/api/v1/models", files={"bundle": (p.name, fh, "application/octet-stream")})
            assert r.status_code in (200, 201), r.text

    def devices(self, select: str | None = None) -> dict[str, dict[str, Any]]:
        params = {"select": select} if select else None
        r = self.http.get("/api/v1/devices", params=params)
        assert r.status_code == 200, r.text
        return {d["device_id"]: d for d in r.json()}

    def wait_online(self, n: int, timeout: float = 90) -> None:
        def ok() -> bool:
            devs = self.devices()
            return sum(1 for d in devs.values() if d["online"] and d["model"] == "lin:1.0.0") >= n

        wait_until(ok, timeout, 0.5, f"{n} devices online on lin:1.0.0")

    def create(self, **body: Any) -> dict[str, Any]:
        r = self.http.post("/api/v1/campaigns", json={"created_by": "tester", **body})
        assert r.status_code == 201, r.text
        return r.json()  # type: ignore[no-any-return]

    def campaign(self, cid: str) -> dict[str, Any]:
        r = self.http.get(f"/api/v1/campaigns/{cid}")
        assert r.status_code == 200, r.text
        return r.json()  # type: ignore[no-any-return]

    def wait_state(self, cid: str, states: set[str], timeout: float = 120) -> dict[str, Any]:
        def done() -> dict[str, Any] | None:
            c = self.campaign(cid)
            return c if c["state"] in states else None

        return wait_until(done, timeout, 0.3, f"campaign {cid} in {states}")  # type: ignore[no-any-return]

    def audit(self, cid: str) -> list[dict[str, Any]]:
        r = self.http.get("/api/v1/audit", params={"campaign_id": cid})
        assert r.status_code == 200, r.text
        return r.json()  # type: ignore[no-any-return]


@pytest.fixture
def fleet_factory(
    tmp_path: Path, mosquitto: Any, models: Models, hub_db: str | None
) -> Iterator[Callable[..., Fleet]]:
    started: list[Fleet] = []

    def make(**sim_kw: Any) -> Fleet:
        hub = HubProcess(
            tmp_path / "hub", db_url=hub_db, broker_url=mosquitto.url,
            env={"EDGEFLEET_CAMPAIGN_TICK_S": "0.3", "EDGEFLEET_DEPLOYMENT_HEALTH_WINDOW_S": "1"},
        ).start()
        cfg = SimConfig(
            broker_url=mosquitto.url, devices=sim_kw.pop("devices", N_DEVICES), data_dir=tmp_path / "sim",
            trust_root=hub.root_json(), processes=2, preinstall=(models.v1,), telemetry_interval=1.0,
            infer_interval=0.25, **sim_kw,
        )
        sim = SimFleet(cfg)
        f = Fleet(hub, sim, models)
        started.append(f)
        f.upload(models.v1, models.v2, models.v3)
        sim.start()
        f.wait_online(cfg.devices)
        return f

    yield make
    for f in started:
        f.sim.stop()
        f.hub.stop()
        f.http.close()
