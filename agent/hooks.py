"""State hooks: operator scripts run when the lifecycle enters or leaves a state.

Like Mender's state scripts: an executable ``<hooks_dir>/<state>_enter`` runs after the
state is saved and before its work; ``<state>_leave`` runs after the work, before the
transition is saved. A hook that exits non-zero or times out fails the state (the
lifecycle takes its ``fail`` transition), except while rolling back, where a failing
hook is logged and ignored so that nothing can block a rollback.

Hooks get ``EDGEFLEET_STATE``, ``EDGEFLEET_HOOK`` (enter/leave), ``EDGEFLEET_DEPLOYMENT_ID``,
``EDGEFLEET_MODEL`` and ``EDGEFLEET_DEVICE_ID`` in their environment, on top of the
agent's own environment less its other ``EDGEFLEET_`` settings, which can hold
credentials (see :func:`agent.commands.command_environment`).

A hook runs as :func:`agent.commands.run_command` runs any device-side command: in a
session of its own, its output not held in memory, its whole process group killed on a
timeout or when the agent stops.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from threading import Event

from agent.commands import STDERR_TAIL_BYTES, command_environment, redact_userinfo, run_command

__all__ = ["HookFailed", "Hooks"]

log = logging.getLogger(__name__)

EXCERPT_CHARS = 500
"""Longest stderr excerpt in a hook's error (it goes into the deployment status)."""


class HookFailed(Exception):
    """A hook exited non-zero, timed out, could not run, or was stopped."""


def _excerpt(raw: bytes) -> str:
    """The end of a hook's stderr fit for the deployment status: URL passwords redacted,
    at most ``EXCERPT_CHARS``. When the start was cut off, a first word that holds an
    ``@`` loses everything up to it (it could be the end of a URL whose scheme was cut,
    with its password)."""
    text = redact_userinfo(raw.decode(errors="replace")).strip()
    cut = len(raw) >= STDERR_TAIL_BYTES
    if len(text) > EXCERPT_CHARS:
        text, cut = text[-EXCERPT_CHARS:], True
    if not cut:
        return text
    m = re.match(r"\S*@", text)
    return "…" + (text[m.end():] if m else text)


@dataclass(frozen=True)
class Hooks:
    directory: Path | None
    timeout_s: float = 60.0

    def run(self, state: str, when: str, env: dict[str, str], stop: Event | None = None) -> None:
        """Run ``<state>_<when>`` if it exists; kill it (and what it started) when
        ``stop`` is set.

        Raises:
            HookFailed: the hook failed or was stopped; the message says how.
        """
        if self.directory is None:
            return
        path = self.directory / f"{state}_{when}"
        if not path.exists():
            return
        if not os.access(path, os.X_OK):
            raise HookFailed(f"hook {path} is not executable")
        full_env = command_environment({"EDGEFLEET_STATE": state, "EDGEFLEET_HOOK": when, **env})
        try:
            r = run_command([str(path)], timeout_s=self.timeout_s, stop=stop, env=full_env)
        except OSError as e:
            raise HookFailed(f"hook {path.name} could not run: {e}") from e
        if r.stopped:
            raise HookFailed(f"hook {path.name} stopped: the agent is stopping")
        if r.timed_out:
            raise HookFailed(f"hook {path.name} timed out after {self.timeout_s:g}s")
        if r.returncode != 0:
            raise HookFailed(f"hook {path.name} exited {r.returncode}: {_excerpt(r.stderr_tail)}")
        log.info("hook %s ok", path.name)
