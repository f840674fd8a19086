"""Hub settings: strict, environment-overridable, and a safe passphrase default."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from pydantic import ValidationError

from hub.config import HubSettings


def test_generated_passphrase_is_private_and_stable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.delenv("EDGEFLEET_KEY_PASSPHRASE", raising=False)
    s = HubSettings(data_dir=tmp_path)
    first = s.resolve_passphrase()
    f = tmp_path / "keys.passphrase"
    assert stat.S_IMODE(f.stat().st_mode) == 0o600
    assert "generated" in caplog.text
    assert HubSettings(data_dir=tmp_path).resolve_passphrase() == first and len(first) >= 32


def test_passphrase_from_env_or_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = tmp_path / "pass"
    p.write_text("from-file\n")
    assert HubSettings(data_dir=tmp_path, key_passphrase_file=p).resolve_passphrase() == b"from-file"
    monkeypatch.setenv("EDGEFLEET_KEY_PASSPHRASE", "from-env")
    monkeypatch.setenv("EDGEFLEET_PORT", "9999")
    s = HubSettings(data_dir=tmp_path)
    assert s.resolve_passphrase() == b"from-env" and s.port == 9999
    assert not (tmp_path / "keys.passphrase").exists()


def test_unknown_settings_are_errors(tmp_path: Path) -> None:
    with pytest.raises(ValidationError):
        HubSettings(data_dir=tmp_path, brokr_url="mqtt://x")  # type: ignore[call-arg]
    assert HubSettings(data_dir=tmp_path).database_url.startswith("sqlite:///")
