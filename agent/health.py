"""Application health probes checked during the health window.

Three kinds, each with a timeout, a number of attempts and an initial delay, like the
probes of container orchestrators: ``exec`` (a command exits 0), ``http`` (GET returns
2xx) and ``file`` (a readiness file exists and is newer than the activation).
"""

from __future__ import annotations

import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from threading import Event
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["ProbeConfig", "ProbeFailed", "run_probe"]


class ProbeFailed(Exception):
    """A probe did not pass within its attempts."""


class ProbeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    kind: Literal["exec", "http", "file"] = Field(description="What to check.")
    command: list[str] | None = Field(None, description="exec: argv of the command.")
    url: str | None = Field(None, description="http: URL to GET (2xx passes).")
    path: Path | None = Field(None, description="file: readiness file written after activation.")
    timeout_s: float = Field(5.0, gt=0, le=3600, description="Per attempt.")
    attempts: int = Field(3, ge=1, le=1000, description="Tries before the probe fails.")
    initial_delay_s: float = Field(0.0, ge=0, le=86400, description="Wait after activation before the first try.")
    interval_s: float = Field(1.0, ge=0, le=3600, description="Wait between tries.")

    @model_validator(mode="after")
    def _target(self) -> ProbeConfig:
        need = {"exec": self.command, "http": self.url, "file": self.path}[self.kind]
        if not need:
            raise ValueError(f"a {self.kind} probe needs "
                             f"{ {'exec': 'command', 'http': 'url', 'file': 'path'}[self.kind] }")
        return self


def _attempt(p: ProbeConfig, activated_at: float) -> str | None:
    """None when the probe passes, else why it did not."""
    if p.kind == "exec":
        assert p.command is not None
        try:
            r = subprocess.run(p.command, capture_output=True, timeout=p.timeout_s, check=False)
        except subprocess.TimeoutExpired:
            return f"command timed out after {p.timeout_s}s"
        except OSError as e:
            return f"command could not run: {e}"
        return None if r.returncode == 0 else f"command exited {r.returncode}"
    if p.kind == "http":
        assert p.url is not None
        try:
            with urllib.request.urlopen(p.url, timeout=p.timeout_s) as resp:
                return None if 200 <= resp.status < 300 else f"HTTP {resp.status}"
        except urllib.error.HTTPError as e:
            return f"HTTP {e.code}"
        except (urllib.error.URLError, OSError) as e:
            return f"GET failed: {e}"
    assert p.path is not None
    try:
        mtime = p.path.stat().st_mtime
    except FileNotFoundError:
        return f"{p.path} does not exist"
    return None if mtime >= activated_at else f"{p.path} predates the activation"


def run_probe(p: ProbeConfig, activated_at: float, stop: Event, activated_mono: float) -> None:
    """Run one probe to pass or failure.

    ``activated_at`` is the wall-clock activation time (readiness files are judged by
    their mtime against it); the initial delay is measured on the monotonic clock from
    ``activated_mono``, so a clock step during the health window cannot stretch it.

    Raises:
        ProbeFailed: every attempt failed (the message holds the last reason).
    """
    if stop.wait(max(0.0, p.initial_delay_s - (time.monotonic() - activated_mono))):
        raise ProbeFailed("stopped")
    why = "no attempt made"
    for i in range(p.attempts):
        why = _attempt(p, activated_at) or ""
        if not why:
            return
        if i + 1 < p.attempts and stop.wait(p.interval_s):
            raise ProbeFailed("stopped")
    raise ProbeFailed(f"{p.kind} probe failed after {p.attempts} attempts: {why}")
