"""Running a device-side command: a state hook (:mod:`agent.hooks`) or an ``exec``
health probe (:mod:`agent.health`).

A command runs in a session of its own, stdin and stdout on ``/dev/null``, and only the
last ``STDERR_TAIL_BYTES`` of its stderr are kept. It is done when its own process
exits: a background process it leaves behind keeps running, but the agent stops reading
its stderr then (writes to it fail with EPIPE/SIGPIPE, so such a process should redirect
its output). On a timeout, or when the agent stops, the whole process group is killed; a
process that started a session of its own (``setsid``) is out of reach. Commands get the
agent's environment less its ``EDGEFLEET_`` settings, which can hold credentials
(:func:`command_environment`).
"""

from __future__ import annotations

import os
import re
import selectors
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from threading import Event

__all__ = ["STDERR_TAIL_BYTES", "CommandResult", "command_environment", "redact_userinfo", "run_command"]

STDERR_TAIL_BYTES = 4096
"""How much of a command's stderr is kept (its end); the rest is read and dropped."""
_POLL_S = 0.05  # how often a running command's exit, deadline and stop are checked
_DRAIN_READS = 16  # reads of stderr after the command exits (a background process may keep writing)

# The EDGEFLEET_ variables a command inherits from the agent: who and where it is. The
# others stay behind, because settings can hold credentials (broker_url, repository_url,
# probe URLs in health_probes, webhook URLs, and the hub's db_url and key_passphrase when
# both run on one host) and a hook has no use for the agent's settings.
_INHERITED = frozenset({"EDGEFLEET_DEVICE_ID", "EDGEFLEET_PROFILE", "EDGEFLEET_DATA_DIR"})
# scheme://userinfo@ in free text: everything from the scheme to the last @ of the word
_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)\S*@")


@dataclass(frozen=True)
class CommandResult:
    returncode: int
    """The exit status; negative (the signal) when killed."""
    timed_out: bool
    """Killed at its timeout."""
    stopped: bool
    """Killed because the stop event was set."""
    stderr_tail: bytes
    """The last ``STDERR_TAIL_BYTES`` of its stderr."""


def command_environment(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The agent's environment for a hook or probe command, less its ``EDGEFLEET_``
    settings other than the device id, profile and data folder (settings can hold
    credentials), plus ``extra``."""
    env = {k: v for k, v in os.environ.items()
           if not k.upper().startswith("EDGEFLEET_") or k.upper() in _INHERITED}
    env.update(extra or {})
    return env


def redact_userinfo(text: str) -> str:
    """``text`` with the user and password of every ``scheme://user:password@host`` in
    it replaced by ``***``."""
    return _USERINFO.sub(r"\1***@", text)


def run_command(argv: Sequence[str], *, timeout_s: float, stop: Event | None = None,
                env: Mapping[str, str] | None = None) -> CommandResult:
    """Run ``argv`` until it exits, ``timeout_s`` passes or ``stop`` is set, in a new
    session with stdin and stdout on ``/dev/null``; in the last two cases its whole
    process group is killed. See the module docstring for what is kept of stderr.

    Raises:
        OSError: the command could not be started (not found, not executable, ...).
    """
    deadline = time.monotonic() + timeout_s
    proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env=None if env is None else dict(env),
                            start_new_session=True)
    assert proc.stderr is not None
    fd = proc.stderr.fileno()
    os.set_blocking(fd, False)
    tail = bytearray()
    timed_out = stopped = False
    sel = selectors.DefaultSelector()
    sel.register(fd, selectors.EVENT_READ)
    reading = True
    try:
        while proc.poll() is None:
            left = deadline - time.monotonic()
            if stop is not None and stop.is_set():
                stopped = True
            elif left <= 0:
                timed_out = True
            if stopped or timed_out:
                _kill_group(proc)
                break
            if reading:
                if sel.select(min(_POLL_S, left)):
                    reading = _read_stderr(fd, tail) != 0
            else:  # stderr closed (or handed to nobody): wait for the exit alone
                try:
                    proc.wait(min(_POLL_S, left))
                except subprocess.TimeoutExpired:
                    pass
        for _ in range(_DRAIN_READS if reading else 0):  # what it wrote last, not waiting for more
            if not _read_stderr(fd, tail):  # end of file, or nothing there now
                break
    finally:
        sel.close()
        proc.stderr.close()
        if proc.poll() is None:  # interrupted (KeyboardInterrupt, ...): leave nothing behind
            _kill_group(proc)
    return CommandResult(proc.returncode, timed_out, stopped, bytes(tail))


def _read_stderr(fd: int, tail: bytearray) -> int | None:
    """Read what ``fd`` has into ``tail``, keeping its last ``STDERR_TAIL_BYTES``: the
    bytes read, 0 at end of file, None when nothing is there now."""
    try:
        chunk = os.read(fd, 65536)
    except BlockingIOError:
        return None
    tail += chunk
    del tail[:-STDERR_TAIL_BYTES]
    return len(chunk)


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    # The leader is not reaped yet, so its pid still names its group.
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
