"""State hooks: operator scripts run when the lifecycle enters or leaves a state.

Like Mender's state scripts: an executable ``<hooks_dir>/<state>_enter`` runs after the
state is saved and before its work; ``<state>_leave`` runs after the work, before the
transition is saved. A hook that exits non-zero or times out fails the state (the
lifecycle takes its ``fail`` transition), except while rolling back, where a failing
hook is logged and ignored so that nothing can block a rollback.

Hooks get ``EDGEFLEET_STATE``, ``EDGEFLEET_HOOK`` (enter/leave), ``EDGEFLEET_DEPLOYMENT_ID``,
``EDGEFLEET_MODEL`` and ``EDGEFLEET_DEVICE_ID`` in their environment.
"""

from __future__ import annotations

import logging
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

__all__ = ["HookFailed", "Hooks"]

log = logging.getLogger(__name__)


class HookFailed(Exception):
    """A hook exited non-zero, timed out, or could not run."""


@dataclass(frozen=True)
class Hooks:
    directory: Path | None
    timeout_s: float = 60.0

    def run(self, state: str, when: str, env: dict[str, str]) -> None:
        """Run ``<state>_<when>`` if it exists.

        Raises:
            HookFailed: the hook failed; the message says how.
        """
        if self.directory is None:
            return
        path = self.directory / f"{state}_{when}"
        if not path.exists():
            return
        if not os.access(path, os.X_OK):
            raise HookFailed(f"hook {path} is not executable")
        full_env = {**os.environ, "EDGEFLEET_STATE": state, "EDGEFLEET_HOOK": when, **env}
        try:
            proc = subprocess.run([str(path)], env=full_env, capture_output=True, timeout=self.timeout_s,
                                  check=False)
        except subprocess.TimeoutExpired as e:
            raise HookFailed(f"hook {path.name} timed out after {self.timeout_s:.0f}s") from e
        except OSError as e:
            raise HookFailed(f"hook {path.name} could not run: {e}") from e
        if proc.returncode != 0:
            tail = proc.stderr.decode(errors="replace").strip()[-500:]
            raise HookFailed(f"hook {path.name} exited {proc.returncode}: {tail}")
        log.info("hook %s ok", path.name)
