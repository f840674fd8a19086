"""Run a hub and agents as real local processes (for the demo, tests and benchmarks).

Each process is the real ``edgefleet`` command, so what runs here is what runs on a
device or a server; logs go to files in the given folder.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

__all__ = ["free_port", "HubProcess", "AgentProcess", "wait_until"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(predicate, timeout: float, interval: float = 0.1, what: str = "condition"):
    """Poll ``predicate`` until it returns a truthy value; raise TimeoutError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def _edgefleet() -> list[str]:
    return [sys.executable, "-m", "agent.cli"]


@dataclass
class HubProcess:
    data_dir: Path
    db_url: str | None = None
    broker_url: str | None = None
    port: int = field(default_factory=free_port)
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> HubProcess:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        cmd = [*_edgefleet(), "hub", "serve", "--data-dir", str(self.data_dir),
               "--host", "127.0.0.1", "--port", str(self.port)]
        if self.db_url:
            cmd += ["--db", self.db_url]
        if self.broker_url:
            cmd += ["--broker", self.broker_url]
        env = {**os.environ, "EDGEFLEET_KEY_PASSPHRASE": "local-fleet-passphrase", **self.env}
        log = open(self.data_dir / "hub.log", "ab")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        wait_until(self._healthy, timeout, 0.2, f"the hub at {self.url} (log: {self.data_dir / 'hub.log'})")
        return self

    def _healthy(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"hub exited with {self.proc.returncode}; see {self.data_dir / 'hub.log'}")
        try:
            return httpx.get(self.url + "/healthz", timeout=1.0).status_code == 200
        except httpx.HTTPError:
            return False

    def health(self) -> dict:
        return httpx.get(self.url + "/healthz", timeout=5).json()

    @property
    def broker(self) -> str:
        """The broker the hub uses (its embedded one when none was given)."""
        return self.broker_url or self.health()["broker_url"]

    def root_json(self) -> Path:
        return self.data_dir / "repository" / "metadata" / "1.root.json"

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@dataclass
class AgentProcess:
    device_id: str
    profile: str
    broker_url: str
    data_dir: Path
    trust_root: Path | None = None
    api_port: int = 0
    telemetry_interval: float = 2.0
    tags: list[str] = field(default_factory=list)
    extra_env: dict[str, str] = field(default_factory=dict)
    repository_url: str | None = None
    proc: subprocess.Popen | None = None

    def start(self) -> AgentProcess:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        cmd = [*_edgefleet(), "agent", "run", "--broker", self.broker_url, "--device-id", self.device_id,
               "--profile", self.profile, "--data-dir", str(self.data_dir),
               "--api-port", str(self.api_port), "--telemetry-interval", str(self.telemetry_interval)]
        if self.trust_root is not None:
            cmd += ["--trust-root", str(self.trust_root)]
        for t in self.tags:
            cmd += ["--tag", t]
        if self.repository_url:
            cmd += ["--repository-url", self.repository_url]
        log = open(self.data_dir / "agent.log", "ab")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **self.extra_env})
        return self

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
