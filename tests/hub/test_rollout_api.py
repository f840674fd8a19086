"""Campaign and capture routes refuse out-of-range input with a 4xx that says what
was wrong, on SQLite and PostgreSQL alike (they were 500s: an OverflowError, and a
PostgreSQL JSON column refusing Infinity)."""

from __future__ import annotations

from pathlib import Path

import pytest

from hub import registry
from tests.hub.bundles import make_bundle
from tests.hub.conftest import HubHarness


@pytest.mark.parametrize(
    ("gate", "detail"),
    [
        ("install_failures<=" + "9" * 400, "longer than 200 characters"),
        ("install_failures<=" + "9" * 150, "is out of range; install_failures takes 0 to 10,000,000"),
        ("psi<=" + "9" * 150, "is out of range; psi takes 0 to 100"),
        ("error_rate<=2", "is out of range; error_rate takes 0 to 1"),
        ("health_failures<=150%", "is out of range; health_failures takes 0 to 100%"),
    ],
)
def test_campaign_gate_out_of_range_is_a_400_naming_the_gate(
    hub: HubHarness, tmp_path: Path, gate: str, detail: str
) -> None:
    with hub.hub.db.session() as s:
        registry.add_bundle(s, hub.hub.repository, make_bundle(tmp_path, version="2.0.0"))
    r = hub.client.post("/api/v1/campaigns", json={"model": "tiny:2.0.0", "select": "all", "gates": [gate]})
    assert r.status_code == 400, r.text
    assert r.json()["detail"].startswith(f"gate {gate[:20]!r}"[:-1]) and detail in r.json()["detail"]
    assert hub.client.get("/api/v1/campaigns").json() == []


@pytest.mark.parametrize(
    ("capture_id", "status"),
    [("99999999999999999999", 422), (str(2**63), 422), ("0", 422), ("-1", 422), (str(2**63 - 1), 404)],
)
def test_capture_id_out_of_range_is_a_422(hub: HubHarness, capture_id: str, status: int) -> None:
    r = hub.client.get(f"/api/v1/captures/{capture_id}/npz")
    assert r.status_code == status, r.text
    if status == 422:
        assert r.json()["detail"][0]["loc"] == ["path", "capture_id"]
