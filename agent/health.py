"""Application health probes checked during the health window.

Three kinds, each with a timeout, a number of attempts and an initial delay, like the
probes of container orchestrators: ``exec`` (a command exits 0), ``http`` (GET returns
2xx) and ``file`` (a readiness file exists and is newer than the activation).

``timeout_s`` bounds a whole attempt: an ``exec`` command (run as hooks are, see
:func:`agent.commands.run_command`) is killed with its process group; an ``http`` GET is
cut off however slowly the server answers, redirects included (at most
``MAX_REDIRECTS``). The GET reads the status line and headers only, goes straight to the
host (``http_proxy`` and the like are ignored: a probe checks this device) and
checks TLS certificates as ``ssl.create_default_context`` does. A readiness file
passes when its mtime is at most ``MTIME_TOLERANCE_S`` before the activation, for
filesystems that keep mtimes to a second or two (FAT keeps 2 s). When the stop event is
set, a running attempt is cut off too.
"""

from __future__ import annotations

import http.client
import shlex
import socket
import threading
import time
from pathlib import Path
from threading import Event
from typing import Literal
from urllib.parse import quote, urljoin, urlsplit

from pydantic import BaseModel, ConfigDict, Field, model_validator

from agent.commands import command_environment, run_command
from agent.connection import shown_url

__all__ = ["MAX_REDIRECTS", "MTIME_TOLERANCE_S", "ProbeConfig", "ProbeFailed", "run_probe"]

MAX_REDIRECTS = 5
MTIME_TOLERANCE_S = 2.0
_POLL_S = 0.05  # how often a running GET's deadline and the stop event are checked
_URL_SAFE = "/?#[]@!$&'()*+,;=%:-._~"  # RFC 3986 reserved and unreserved characters, and %
_REDIRECT_CODES = frozenset({301, 302, 303, 307, 308})
_TARGET_FIELD = {"exec": "command", "http": "url", "file": "path"}


class ProbeFailed(Exception):
    """A probe did not pass within its attempts, or was stopped."""


class ProbeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    kind: Literal["exec", "http", "file"] = Field(description="What to check.")
    command: list[str] | None = Field(None, description="exec: argv of the command.")
    url: str | None = Field(None, description="http: http:// or https:// URL to GET (2xx passes).")
    path: Path | None = Field(None, description="file: readiness file written after activation.")
    timeout_s: float = Field(5.0, gt=0, le=3600, description="Per attempt.")
    attempts: int = Field(3, ge=1, le=1000, description="Tries before the probe fails.")
    initial_delay_s: float = Field(0.0, ge=0, le=86400, description="Wait after activation before the first try.")
    interval_s: float = Field(1.0, ge=0, le=3600, description="Wait between tries.")

    @model_validator(mode="after")
    def _target(self) -> ProbeConfig:
        field = _TARGET_FIELD[self.kind]
        if not getattr(self, field):
            raise ValueError(f"a {self.kind} probe needs {field}")
        for other in _TARGET_FIELD.values():
            if other != field and getattr(self, other) is not None:
                raise ValueError(f"{other} does not apply to {self.kind} probes (they take {field})")
        if self.command is not None and not self.command[0]:
            raise ValueError("command[0] must name the program to run, not be empty")
        if self.url is not None:
            _check_url(self.url, "url")
        return self

    def target(self) -> str:
        """What the probe checks, for messages (URL passwords redacted)."""
        if self.command is not None:
            return shlex.join(self.command)[:200]
        if self.url is not None:
            return shown_url(self.url)
        return str(self.path)


def _check_url(url: str, field: str) -> None:
    """Raises ValueError unless ``url`` is an http(s) URL with a host (and a valid port)."""
    shown = shown_url(url)
    if any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in url):
        raise ValueError(f"{field} {shown!r} holds whitespace or control characters")
    u = urlsplit(url)
    if u.scheme.lower() not in ("http", "https") or not u.hostname:
        raise ValueError(f"{field} must be an http:// or https:// URL with a host, got {shown!r}")
    if u.username is not None or u.password is not None:
        raise ValueError(f"{field} {shown!r} carries a user or password: probes send no credentials")
    try:
        _ = u.port  # urlsplit checks the port only when asked
    except ValueError:
        raise ValueError(f"{field} {shown!r}: the port must be a number from 0 to 65535") from None


def _attempt(p: ProbeConfig, activated_at: float, stop: Event) -> str | None:
    """None when the probe passes, else why it did not."""
    if p.kind == "exec":
        assert p.command is not None
        try:
            r = run_command(p.command, timeout_s=p.timeout_s, stop=stop, env=command_environment())
        except OSError as e:
            return f"command could not run: {e}"
        if r.stopped:
            return "stopped"
        if r.timed_out:
            return f"command timed out after {p.timeout_s:g}s"
        return None if r.returncode == 0 else f"command exited {r.returncode}"
    if p.kind == "http":
        assert p.url is not None
        return _http_attempt(p.url, p.timeout_s, stop)
    assert p.path is not None
    try:
        mtime = p.path.stat().st_mtime
    except FileNotFoundError:
        return f"{p.path} does not exist"
    except NotADirectoryError:
        return f"{p.path} cannot exist: part of its path is a file, not a folder"
    except PermissionError:
        return f"{p.path} cannot be checked: permission denied on it or a folder above it"
    except OSError as e:
        return f"{p.path} cannot be checked: {e.strerror or e}"
    # The tolerance is for coarse mtimes (see the module docstring).
    return None if mtime >= activated_at - MTIME_TOLERANCE_S else f"{p.path} predates the activation"


def _http_attempt(url: str, timeout_s: float, stop: Event) -> str | None:
    """GET ``url`` within ``timeout_s`` in all: http.client's socket timeout bounds
    each read, not the attempt, so the GET runs on a worker thread and is cut off here
    (its sockets shut down) at the deadline or when ``stop`` is set. A worker stuck in
    a name lookup, which no socket timeout bounds, is left to finish on its own."""
    deadline = time.monotonic() + timeout_s
    conns: list[http.client.HTTPConnection] = []
    cancelled = Event()
    result: list[str | None] = []
    worker = threading.Thread(target=lambda: result.append(_http_get(url, deadline, conns, cancelled)),
                              name="http-probe", daemon=True)
    worker.start()
    while worker.is_alive():
        left = deadline - time.monotonic()
        if stop.is_set():
            why = "stopped"
            break
        if left <= 0:
            why = f"GET timed out after {timeout_s:g}s"
            break
        worker.join(min(_POLL_S, left))
    else:
        return result[0] if result else "GET failed: the probe thread crashed (see the log)"
    cancelled.set()
    for conn in list(conns):
        sock = conn.sock
        if sock is not None:
            try:  # socket.socket's shutdown, not SSLSocket's, which would unwrap under the reader
                socket.socket.shutdown(sock, socket.SHUT_RDWR)
            except OSError:
                pass
    return why


def _http_get(url: str, deadline: float, conns: list[http.client.HTTPConnection],
              cancelled: Event) -> str | None:
    """The worker of :func:`_http_attempt`: None on 2xx, else why not. Reads the status
    line and headers only (http.client bounds their size), follows redirects."""
    for hop in range(MAX_REDIRECTS + 1):
        left = deadline - time.monotonic()
        if left <= 0 or cancelled.is_set():
            return "GET timed out"
        at = f" at {shown_url(url)}" if hop else ""  # the probe's own URL is in its message
        try:
            u = urlsplit(url)
            cls = http.client.HTTPSConnection if u.scheme.lower() == "https" else http.client.HTTPConnection
            # a direct connection: no proxy, whatever the environment says
            conn = cls(u.hostname or "", u.port, timeout=left)
            conns.append(conn)
            try:
                # percent-encode what is not ASCII (http.client sends the target as is)
                target = quote((u.path or "/") + (f"?{u.query}" if u.query else ""), safe=_URL_SAFE)
                conn.request("GET", target,
                             headers={"Connection": "close", "User-Agent": "edgefleet-agent-probe"})
                resp = conn.getresponse()
                status, location = resp.status, resp.getheader("Location")
            finally:
                conn.close()
        except (http.client.HTTPException, OSError, ValueError) as e:
            return f"GET failed{at}: {str(e) or type(e).__name__}"
        if status not in _REDIRECT_CODES or not location:
            return None if 200 <= status < 300 else f"HTTP {status}{at}"
        url = urljoin(url, location)
        try:
            _check_url(url, "redirect")
        except ValueError as e:
            return f"HTTP {status}{at}: {e}"
    return f"more than {MAX_REDIRECTS} redirects"


def run_probe(p: ProbeConfig, activated_at: float, stop: Event, activated_mono: float) -> None:
    """Run one probe to pass or failure; setting ``stop`` cuts off a running attempt.

    ``activated_at`` is the wall-clock activation time (readiness files are judged by
    their mtime against it); the initial delay is measured on the monotonic clock from
    ``activated_mono``, so a clock step during the health window cannot stretch it.

    Raises:
        ProbeFailed: every attempt failed (the message names the probe and holds the
            last reason), or ``stop`` was set (the message is ``stopped``).
    """
    if stop.wait(max(0.0, p.initial_delay_s - (time.monotonic() - activated_mono))):
        raise ProbeFailed("stopped")
    why = "no attempt made"
    for i in range(p.attempts):
        why = _attempt(p, activated_at, stop) or ""
        if not why:
            return
        if stop.is_set() or (i + 1 < p.attempts and stop.wait(p.interval_s)):
            raise ProbeFailed("stopped")
    raise ProbeFailed(f"{p.kind} probe {p.target()} failed after {p.attempts} attempts: {why}")
