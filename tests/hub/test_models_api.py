"""Bundle upload, listing and the refusal of bad bundles, on SQLite and PostgreSQL."""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest

from tests.hub.bundles import make_bundle
from tests.hub.conftest import HubHarness


def _upload(h: HubHarness, path: Path, data: bytes | None = None):  # type: ignore[no-untyped-def]
    return h.client.post(
        "/api/v1/models", files={"bundle": (path.name, data if data is not None else path.read_bytes())}
    )


def _state(h: HubHarness) -> tuple[object, list[str], list[str]]:
    repo = h.hub.repository
    return (
        h.client.get("/api/v1/models").json(),
        sorted(p.name for p in repo.targets_dir.iterdir()),
        sorted(p.name for p in repo.metadata_dir.iterdir()),
    )


def test_upload_list_show(hub: HubHarness, tmp_path: Path) -> None:
    fp32 = make_bundle(tmp_path, version="1.0.0")
    int8 = make_bundle(tmp_path, version="1.0.0", precision="int8-qdq", selected=True)
    v2 = make_bundle(tmp_path, version="1.10.0", seed=1)

    r = _upload(hub, fp32)
    assert r.status_code == 201, r.text
    b = r.json()["bundle"]
    assert (b["name"], b["version"], b["profile"], b["precision"]) == ("tiny", "1.0.0", "x86-gateway-vnni", "fp32")
    assert b["target_path"] == f"{b['sha256']}.efb"
    assert b["manifest"]["inputs"][0]["name"] == "x"
    assert _upload(hub, int8).status_code == 201
    assert _upload(hub, v2).status_code == 201
    # The same bytes again: accepted, nothing new.
    again = _upload(hub, fp32)
    assert again.status_code == 200 and again.json() == {"created": False, "bundle": b}

    models = hub.client.get("/api/v1/models").json()
    assert [m["name"] for m in models] == ["tiny"]
    assert models[0]["latest"] == "1.10.0"  # semver order, not string order
    assert [v["version"] for v in models[0]["versions"]] == ["1.10.0", "1.0.0"]

    v1 = hub.client.get("/api/v1/models/tiny/1.0.0").json()
    assert sorted((x["precision"], x["selected"]) for x in v1["bundles"]) == [("fp32", False), ("int8-qdq", True)]
    assert hub.client.get("/api/v1/models/tiny").json()["latest"] == "1.10.0"

    # Signed into the repository, downloadable over HTTP with a Range.
    assert hub.hub.repository.target_custom(b["target_path"]).precision == "fp32"  # type: ignore[union-attr]
    part = hub.client.get(f"/api/v1/repository/targets/{b['target_path']}", headers={"Range": "bytes=10-19"})
    assert part.status_code == 206 and part.content == fp32.read_bytes()[10:20]
    root = hub.client.get("/api/v1/repository/root.json")
    assert root.status_code == 200 and root.json()["signed"]["_type"] == "root"


def test_unknown_model_is_404(hub: HubHarness) -> None:
    for url in ("/api/v1/models/nope", "/api/v1/models/nope/1.0.0", "/api/v1/repository/targets/x.efb",
                "/api/v1/repository/../../etc/passwd", "/api/v1/devices/nope", "/api/v1/deployments/nope"):
        r = hub.client.get(url)
        assert r.status_code == 404, url
        assert r.json()["detail"]


def test_same_identity_different_bytes_conflicts(hub: HubHarness, tmp_path: Path) -> None:
    assert _upload(hub, make_bundle(tmp_path, seed=0)).status_code == 201
    r = _upload(hub, make_bundle(tmp_path, seed=5))  # same name, version, profile, precision
    assert r.status_code == 409
    assert "immutable" in r.json()["detail"]


def _model_offset(path: Path) -> int:
    with tarfile.open(path) as tf:
        return tf.getmember("model.onnx").offset_data


def _flip_model_byte(path: Path) -> bytes:
    off = _model_offset(path)
    data = bytearray(path.read_bytes())
    data[off + 20] ^= 0x01
    return bytes(data)


@pytest.mark.parametrize(
    ("case", "expect"),
    [
        ("truncated", "truncated"),
        ("flipped_model_byte", "does not match its manifest"),
        ("flipped_header_byte", "invalid bundle"),
        ("not_a_tar", "not a bundle"),
        ("oversized", "upload limit"),
        ("empty", "empty upload"),
    ],
)
def test_bad_uploads_are_refused_and_change_nothing(
    hub_factory, db_url: str, session_mosquitto, tmp_path: Path, case: str, expect: str  # type: ignore[no-untyped-def]
) -> None:
    h = hub_factory(db_url, session_mosquitto.url, max_bundle_bytes=64 * 1024)
    good = make_bundle(tmp_path)
    assert _upload(h, good).status_code == 201
    before = _state(h)

    bad_path = make_bundle(tmp_path, version="2.0.0")
    payload = {
        # Cut inside the model member (cutting only the tar's zero padding loses nothing).
        "truncated": bad_path.read_bytes()[: _model_offset(bad_path) + 50],
        "flipped_model_byte": _flip_model_byte(bad_path),
        "flipped_header_byte": bytes(b ^ 0xFF if i == 600 else b for i, b in enumerate(bad_path.read_bytes())),
        "not_a_tar": b"this is not a tar archive at all" * 100,
        "oversized": make_bundle(tmp_path, version="3.0.0", padding=80 * 1024).read_bytes(),
        "empty": b"",
    }[case]
    if case == "empty":
        r = h.client.post("/api/v1/models", content=b"", headers={"content-type": "application/octet-stream"})
    else:
        r = _upload(h, bad_path, payload)
    assert r.status_code == 400, r.text
    assert expect in r.json()["detail"]
    assert _state(h) == before
    assert list(h.hub.uploads_dir.iterdir()) == []
