"""Fixtures shared by every test package: real brokers, tiny real models, bundles."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import MosquittoBroker, free_port, missing_service


@pytest.fixture(scope="session")
def mosquitto_bin() -> str:
    path = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
    if path is None:
        missing_service("mosquitto", "mosquitto is not installed (apt-get install mosquitto)")
    return path


@pytest.fixture
def mosquitto(tmp_path: Path, mosquitto_bin: str) -> Iterator[MosquittoBroker]:
    """A private Mosquitto on a free port (so tests can stop and restart it)."""
    broker = MosquittoBroker(mosquitto_bin, tmp_path / "mosquitto", free_port())
    broker.start()
    yield broker
    broker.stop()


@pytest.fixture
def procs() -> Iterator[list]:
    """Processes (anything with .stop()) to stop at the end of a test, whatever happens."""
    started: list = []
    yield started
    for p in reversed(started):
        p.stop()


__all__ = ["free_port", "socket", "subprocess", "time"]
