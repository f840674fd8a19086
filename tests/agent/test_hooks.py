"""State hooks (agent.hooks): bounded in time and memory, killed with what they started,
cut off when the agent stops, and kept away from the agent's credentials."""

from __future__ import annotations

import os
import threading
import time
import tracemalloc
from pathlib import Path

import pytest

from agent.hooks import HookFailed, Hooks
from tests.support import kill_pid_in

ENV = {"EDGEFLEET_DEPLOYMENT_ID": "dep1", "EDGEFLEET_MODEL": "m:1", "EDGEFLEET_DEVICE_ID": "dev"}


def wait_dead(pid: int, within_s: float = 1.0) -> bool:
    """True once ``pid`` is gone (or a zombie) within ``within_s``."""
    end = time.monotonic() + within_s
    while True:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return True
        if state == "Z":
            return True
        if time.monotonic() > end:
            return False
        time.sleep(0.02)


def hook(directory: Path, name: str, body: str) -> None:
    p = directory / name
    p.write_text("#!/bin/sh\n" + body + "\n")
    p.chmod(0o755)


def run_timed(hooks: Hooks, state: str, **kw: object) -> tuple[str, float]:
    t0 = time.monotonic()
    try:
        hooks.run(state, "enter", dict(ENV), **kw)  # type: ignore[arg-type]
        return "ok", time.monotonic() - t0
    except HookFailed as e:
        return str(e), time.monotonic() - t0


def test_hook_that_leaves_a_background_process_passes(tmp_path):
    pidfile = tmp_path / "pid"
    hook(tmp_path, "activating_enter", f"sleep 30 &\necho $! > {pidfile}\necho 'restarted my service'\nexit 0")
    try:
        got, took = run_timed(Hooks(tmp_path, timeout_s=2), "activating")
        assert got == "ok" and took < 1.0
    finally:
        kill_pid_in(pidfile)


def test_hook_timeout_kills_what_the_hook_started(tmp_path):
    pidfile = tmp_path / "pid"
    hook(tmp_path, "installing_enter", f"sleep 30 &\necho $! > {pidfile}\nwait")
    got, took = run_timed(Hooks(tmp_path, timeout_s=0.5), "installing")
    pid = int(pidfile.read_text())
    dead = wait_dead(pid)
    if not dead:
        os.kill(pid, 9)
    assert got == "hook installing_enter timed out after 0.5s"
    assert took < 1.2
    assert dead, "the hook's background process outlived its timeout"


def test_stop_cuts_off_a_running_hook(tmp_path):
    pidfile = tmp_path / "pid"
    hook(tmp_path, "health_check_enter", f"echo $$ > {pidfile}\nexec sleep 20")
    stop = threading.Event()
    threading.Timer(0.3, stop.set).start()
    got, took = run_timed(Hooks(tmp_path, timeout_s=20), "health_check", stop=stop)
    assert "health_check_enter stopped" in got and took < 1.2
    assert wait_dead(int(pidfile.read_text()))


def test_hook_output_is_not_held_in_memory(tmp_path):
    hook(tmp_path, "installing_enter",
         "head -c 33554432 /dev/zero\nyes 'a line of output' | head -c 33554432 >&2\n"
         "echo 'last words' >&2\nexit 4")
    tracemalloc.start()
    try:
        got, _ = run_timed(Hooks(tmp_path, timeout_s=10), "installing")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert got.startswith("hook installing_enter exited 4: …") and got.endswith("last words")
    assert len(got) < 600
    assert peak < 4 << 20, f"{peak} bytes held for 64 MiB of output"


def test_hook_environment_has_no_credentials(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEFLEET_BROKER_URL", "mqtt://user:s3cret@127.0.0.1:1883")
    monkeypatch.setenv("EDGEFLEET_REPOSITORY_URL", "https://user:s3cret@hub/api/v1/repository/")
    monkeypatch.setenv("edgefleet_key_passphrase", "s3cret")
    monkeypatch.setenv("EDGEFLEET_PROFILE", "x86-gateway-vnni")
    monkeypatch.setenv("EDGEFLEET_HEALTH_PROBES", '[{"kind":"http","url":"http://u:s3cret@app/ready"}]')
    monkeypatch.setenv("EDGEFLEET_MONITORING_ALERT_WEBHOOKS", '["https://hooks.example/T0/s3cret"]')
    monkeypatch.setenv("EDGEFLEET_API_KEY", "s3cret")
    monkeypatch.setenv("OPERATOR_VAR", "kept")
    out = tmp_path / "env"
    hook(tmp_path, "self_test_enter", f"env > {out}")
    assert run_timed(Hooks(tmp_path), "self_test")[0] == "ok"
    env = dict(line.split("=", 1) for line in out.read_text().splitlines() if "=" in line)
    assert "s3cret" not in out.read_text()
    assert env["OPERATOR_VAR"] == "kept" and env["EDGEFLEET_PROFILE"] == "x86-gateway-vnni"
    assert env["EDGEFLEET_STATE"] == "self_test" and env["EDGEFLEET_HOOK"] == "enter"
    assert env["EDGEFLEET_DEPLOYMENT_ID"] == "dep1" and env["EDGEFLEET_DEVICE_ID"] == "dev"


@pytest.mark.parametrize("line, shown", [
    ("cannot reach mqtt://user:s3cret@127.0.0.1:1883 (refused)", "cannot reach mqtt://***@127.0.0.1:1883 (refused)"),
    ("GET https://u:p@ss:s3cret@hub/x failed", "GET https://***@hub/x failed"),
    ("token at http://:s3cret@h/ and http://plain/", "token at http://***@h/ and http://plain/"),
])
def test_hook_error_redacts_url_passwords(tmp_path, line, shown):
    hook(tmp_path, "verifying_enter", f"echo '{line}' >&2\nexit 1")
    got, _ = run_timed(Hooks(tmp_path), "verifying")
    assert got == f"hook verifying_enter exited 1: {shown}"
    assert "s3cret" not in got


def test_hook_that_cannot_run_names_the_hook(tmp_path):
    (tmp_path / "downloading_enter").write_text("#!/nonexistent/interpreter\n")
    (tmp_path / "downloading_enter").chmod(0o755)
    got, _ = run_timed(Hooks(tmp_path), "downloading")
    assert got.startswith("hook downloading_enter could not run:")


@pytest.mark.parametrize("stderr, shown", [
    # One long word, cut: its end is still worth showing.
    ("x" * 3000 + '{"error":"model reload refused"}', "…" + ("x" * 3000 + '{"error":"model reload refused"}')[-500:]),
    # A cut word with an @ may end a URL whose scheme and password were cut off.
    ("y" * 4090 + "s3cret@hub/x failed", "…hub/x failed"),
])
def test_a_cut_stderr_keeps_its_end_and_never_a_cut_password(tmp_path, stderr, shown):
    (tmp_path / "err").write_text(stderr)
    hook(tmp_path, "verifying_enter", f"cat {tmp_path / 'err'} >&2\nexit 1")
    got, _ = run_timed(Hooks(tmp_path), "verifying")
    assert got == f"hook verifying_enter exited 1: {shown}"
