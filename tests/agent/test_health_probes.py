"""Health probes (agent.health): every attempt is bounded in time and memory, cut off by
the stop event, leaves no process behind, and bad settings fail at config time."""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
import tracemalloc
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pydantic import ValidationError

from agent.health import MTIME_TOLERANCE_S, ProbeConfig, ProbeFailed, run_probe
from tests.support import kill_pid_in

Handler = Callable[[socket.socket, int], None]


@pytest.fixture
def serve() -> Iterator[Callable[[Handler], int]]:
    """Start a raw TCP server on 127.0.0.1 whose connections go to a handler; its port."""
    listeners: list[socket.socket] = []

    def start(handler: Handler) -> int:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        listeners.append(s)
        port = s.getsockname()[1]

        def one(c: socket.socket) -> None:
            with c:
                try:
                    handler(c, port)
                except OSError:
                    pass

        def loop() -> None:
            while True:
                try:
                    c, _ = s.accept()
                except OSError:
                    return
                threading.Thread(target=one, args=(c,), daemon=True).start()

        threading.Thread(target=loop, daemon=True).start()
        return port

    yield start
    for s in listeners:
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        s.close()


def probe_within(p: ProbeConfig, cap_s: float, *, stop: threading.Event | None = None,
                 activated_at: float | None = None) -> tuple[str, float]:
    """Run ``p``; ("passed" or the ProbeFailed message, seconds). Fails the test when
    the probe is still running after ``cap_s``."""
    stop = stop or threading.Event()
    out: list[tuple[str, float]] = []

    def go() -> None:
        t0 = time.monotonic()
        try:
            run_probe(p, time.time() - 1 if activated_at is None else activated_at, stop, time.monotonic())
            out.append(("passed", time.monotonic() - t0))
        except ProbeFailed as e:
            out.append((str(e), time.monotonic() - t0))

    t = threading.Thread(target=go, daemon=True)
    t.start()
    t.join(cap_s)
    assert out, f"probe still running after {cap_s}s"
    return out[0]


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def wait_dead(pid: int, within_s: float = 1.0) -> bool:
    end = time.monotonic() + within_s
    while alive(pid):
        if time.monotonic() > end:
            return False
        time.sleep(0.02)
    return True


# --- http --------------------------------------------------------------------------

def _ok(c: socket.socket, port: int) -> None:
    c.recv(4096)
    c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")


def _trickle(c: socket.socket, port: int) -> None:  # a status line, then one byte every 0.1 s
    c.recv(4096)
    c.sendall(b"HTTP/1.1 200 OK\r\n")
    for _ in range(50):
        c.sendall(b"X")
        time.sleep(0.1)


def _slow_redirect(c: socket.socket, port: int) -> None:  # each hop answers after 0.3 s
    c.recv(4096)
    time.sleep(0.3)
    c.sendall(f"HTTP/1.1 302 Found\r\nLocation: http://127.0.0.1:{port}/next\r\n"
              "Content-Length: 0\r\n\r\n".encode())


def _silent(c: socket.socket, port: int) -> None:
    c.recv(4096)
    time.sleep(5)


def _endless_body(c: socket.socket, port: int) -> None:
    c.recv(4096)
    c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 10000000000\r\n\r\n")
    end = time.monotonic() + 3
    while time.monotonic() < end:
        c.sendall(b"x" * 65536)


def test_http_probe_cuts_off_a_server_that_trickles_headers(serve):
    port = serve(_trickle)
    p = ProbeConfig(kind="http", url=f"http://127.0.0.1:{port}/ready", timeout_s=0.5, attempts=1)
    why, took = probe_within(p, 2.5)
    assert "timed out" in why and f"127.0.0.1:{port}/ready" in why
    assert took < 1.2


def test_http_probe_timeout_covers_all_redirects(serve):
    port = serve(_slow_redirect)
    p = ProbeConfig(kind="http", url=f"http://127.0.0.1:{port}/ready", timeout_s=0.5, attempts=1)
    why, took = probe_within(p, 2.5)
    assert "timed out" in why
    assert took < 1.2


def test_http_probe_reads_the_status_not_the_body(serve):
    port = serve(_endless_body)
    p = ProbeConfig(kind="http", url=f"http://127.0.0.1:{port}/ready", timeout_s=2, attempts=1)
    assert probe_within(p, 2.5)[0] == "passed"


def test_http_probe_percent_encodes_a_non_ascii_path(serve):
    # http.client sends the request target as is and refuses what is not ASCII.
    seen: list[bytes] = []

    def record(c: socket.socket, port: int) -> None:
        seen.append(c.recv(4096).split(b"\r\n", 1)[0])
        c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")

    port = serve(record)
    p = ProbeConfig(kind="http", url=f"http://127.0.0.1:{port}/bereit/grün?q=ä%20b", timeout_s=2, attempts=1)
    assert probe_within(p, 2.5)[0] == "passed"
    assert seen == [b"GET /bereit/gr%C3%BCn?q=%C3%A4%20b HTTP/1.1"]


def test_http_probe_ignores_proxy_variables(serve, monkeypatch):
    port = serve(_ok)
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    # urllib reads proxy variables once, into its first opener: start from none, so a
    # probe that goes through urllib sees the variables above whatever ran before.
    monkeypatch.setattr(urllib.request, "_opener", None)
    p = ProbeConfig(kind="http", url=f"http://127.0.0.1:{port}/ready", timeout_s=1, attempts=1)
    assert probe_within(p, 2.5)[0] == "passed"


def test_stop_cuts_off_a_running_http_attempt(serve):
    port = serve(_silent)
    p = ProbeConfig(kind="http", url=f"http://127.0.0.1:{port}/ready", timeout_s=30, attempts=1)
    stop = threading.Event()
    threading.Timer(0.2, stop.set).start()
    why, took = probe_within(p, 2.5, stop=stop)
    assert why == "stopped" and took < 1.0


# --- exec --------------------------------------------------------------------------

def test_exec_probe_passes_when_its_command_leaves_a_background_process(tmp_path):
    pidfile = tmp_path / "pid"
    p = ProbeConfig(kind="exec", command=["sh", "-c", f"sleep 30 & echo $! > {pidfile}; exit 0"],
                    timeout_s=2, attempts=1)
    try:
        why, took = probe_within(p, 2.8)
        assert why == "passed" and took < 1.0
    finally:
        kill_pid_in(pidfile)


def test_exec_probe_timeout_kills_the_whole_process_group(tmp_path):
    pidfile = tmp_path / "pid"
    p = ProbeConfig(kind="exec", command=["sh", "-c", f"sleep 30 & echo $! > {pidfile}; wait"],
                    timeout_s=0.5, attempts=1)
    why, took = probe_within(p, 2.5)
    pid = int(pidfile.read_text())
    dead = wait_dead(pid)
    if not dead:
        os.kill(pid, 9)
    assert "timed out after 0.5s" in why and took < 1.2
    assert dead, "the command's background process outlived its timeout"


def test_stop_cuts_off_a_running_exec_attempt(tmp_path):
    pidfile = tmp_path / "pid"
    p = ProbeConfig(kind="exec", command=["sh", "-c", f"echo $$ > {pidfile}; exec sleep 20"],
                    timeout_s=20, attempts=1)
    stop = threading.Event()
    threading.Timer(0.3, stop.set).start()
    why, took = probe_within(p, 2.5, stop=stop)
    assert why == "stopped" and took < 1.2
    assert wait_dead(int(pidfile.read_text()))


def test_exec_probe_does_not_hold_the_command_output_in_memory():
    p = ProbeConfig(kind="exec", timeout_s=10, attempts=1, command=[
        "sh", "-c", "head -c 33554432 /dev/zero; head -c 33554432 /dev/zero >&2"])
    tracemalloc.start()
    try:
        why, _ = probe_within(p, 2.8)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert why == "passed"
    assert peak < 4 << 20, f"{peak} bytes held for 64 MiB of output"


def test_exec_probe_command_does_not_see_credential_variables(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEFLEET_BROKER_URL", "mqtt://u:s3cret@127.0.0.1:1883")
    out = tmp_path / "env"
    p = ProbeConfig(kind="exec", command=[sys.executable, "-c",
                                          f"import os; open({str(out)!r}, 'w').write(repr(dict(os.environ)))"],
                    timeout_s=2, attempts=1)
    assert probe_within(p, 2.8)[0] == "passed"
    assert "s3cret" not in out.read_text()


# --- file --------------------------------------------------------------------------

def test_file_probe_under_a_regular_file_fails_with_a_reason(tmp_path):
    (tmp_path / "plain").write_text("")
    p = ProbeConfig(kind="file", path=tmp_path / "plain" / "ready", attempts=1)
    why, _ = probe_within(p, 2.0)
    assert "failed after 1 attempts" in why and "is a file" in why and str(p.path) in why


def test_file_probe_that_cannot_be_checked_fails_with_a_reason(tmp_path, monkeypatch):
    # Run as root in CI, a chmod 000 folder would still be readable: make stat refuse.
    ready = tmp_path / "ready"

    def refuse(self: Path, **kw: object) -> os.stat_result:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "stat", refuse)
    why, _ = probe_within(ProbeConfig(kind="file", path=ready, attempts=1), 2.0)
    assert "permission denied" in why and str(ready) in why


@pytest.mark.parametrize("age_s, passes", [(MTIME_TOLERANCE_S - 0.5, True), (MTIME_TOLERANCE_S + 1.0, False)])
def test_file_probe_allows_for_coarse_mtimes(tmp_path, age_s, passes):
    activated_at = time.time()
    ready = tmp_path / "ready"
    ready.write_text("")
    os.utime(ready, (activated_at - age_s, activated_at - age_s))
    why, _ = probe_within(ProbeConfig(kind="file", path=ready, attempts=1), 2.0, activated_at=activated_at)
    assert (why == "passed") is passes, why


# --- settings ----------------------------------------------------------------------

@pytest.mark.parametrize("settings, says", [
    ({"kind": "http", "url": "/ready"}, "url must be an http:// or https:// URL with a host"),
    ({"kind": "http", "url": "localhost:8080/ready"}, "url must be an http:// or https:// URL"),
    ({"kind": "http", "url": "file:///etc/hostname"}, "url must be an http:// or https:// URL"),
    ({"kind": "http", "url": "ftp://127.0.0.1/x"}, "url must be an http:// or https:// URL"),
    ({"kind": "http", "url": "http://:8080/x"}, "with a host"),
    ({"kind": "http", "url": "http://127.0.0.1:99999/x"}, "the port must be a number"),
    ({"kind": "http", "url": "http://127.0.0.1/a b"}, "whitespace or control characters"),
    ({"kind": "http", "url": "http://u:s3cret@/x"}, "'http://***@/x'"),
    ({"kind": "http", "url": "http://u:s3cret@127.0.0.1/x"}, "'http://***@127.0.0.1/x' carries a user or password"),
    ({"kind": "exec", "command": ["true"], "url": "http://x/"}, "url does not apply to exec probes"),
    ({"kind": "http", "url": "http://x/", "path": "/tmp/r"}, "path does not apply to http probes"),
    ({"kind": "file", "path": "/tmp/r", "command": ["true"]}, "command does not apply to file probes"),
    ({"kind": "exec", "command": [""]}, "command[0] must name the program"),
])
def test_bad_probe_settings_fail_at_config_time(settings, says):
    with pytest.raises(ValidationError) as e:
        ProbeConfig(**settings)
    msg = e.value.errors()[0]["msg"]  # what agent.config.load_settings reports
    assert says in msg
    assert "s3cret" not in msg


@pytest.mark.parametrize("url", ["http://127.0.0.1:8080/ready", "https://[::1]/ready?x=1", "HTTP://host/"])
def test_good_probe_urls_are_accepted(url):
    assert ProbeConfig(kind="http", url=url).url == url
