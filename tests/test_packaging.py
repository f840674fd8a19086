"""`pip install edgefleet[agent]` must not pull the hub's or the compiler's stacks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {"torch", "fastapi", "sqlalchemy", "sqlmodel", "uvicorn", "alembic", "litert-torch"}


def _resolve(extra: str, tmp_path: Path) -> set[str]:
    report = tmp_path / f"{extra}.json"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
         "--report", str(report), f"{ROOT}[{extra}]"],
        capture_output=True, text=True, timeout=600,
    )
    if proc.returncode != 0:
        if "Could not find a version" in proc.stderr or "NewConnectionError" in proc.stderr:
            pytest.skip(f"package index unreachable: {proc.stderr[-300:]}")
        raise AssertionError(proc.stderr)
    data = json.loads(report.read_text())
    return {item["metadata"]["name"].lower().replace("_", "-") for item in data["install"]}


def test_agent_extra_pulls_no_hub_or_compiler_dependencies(tmp_path: Path):
    names = _resolve("agent", tmp_path)
    assert {"onnxruntime", "paho-mqtt", "tuf", "cryptography", "numpy"} <= names
    assert not (names & FORBIDDEN), sorted(names & FORBIDDEN)
    # The agent reads its settings without pydantic-settings (3 MiB of RSS on a device).
    assert "pydantic-settings" not in names
