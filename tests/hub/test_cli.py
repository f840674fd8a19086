"""The CLI against a live hub served by uvicorn (embedded broker, SQLite)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn
from click.testing import CliRunner

from hub.app import Hub, create_app
from hub.cli import deploy_command, devices_group, models_group
from hub.server import bind_socket
from tests.hub.bundles import make_bundle
from tests.hub.conftest import SimDevice, make_settings, wait_until


@pytest.fixture
def live_hub(tmp_path: Path) -> Iterator[tuple[str, Hub]]:
    settings = make_settings(tmp_path / "hub", f"sqlite:///{tmp_path / 'hub.db'}", None)
    ready: list[Hub] = []
    app = create_app(settings, on_ready=ready.append)
    sock = bind_socket("127.0.0.1", 0)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    t = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    t.start()
    wait_until(lambda: ready and httpx.get(f"{url}/healthz").status_code == 200)
    yield url, ready[0]
    server.should_exit = True
    t.join(10)


def test_cli_push_list_deploy(
    live_hub: tuple[str, Hub], device_factory: Callable[..., SimDevice], tmp_path: Path
) -> None:
    url, hub = live_hub
    runner = CliRunner()
    b1 = make_bundle(tmp_path)
    b2 = make_bundle(tmp_path, precision="int8-qdq")
    r = runner.invoke(models_group, ["push", str(b1), str(b2), "--hub", url])
    assert r.exit_code == 0, r.output
    assert "int8-qdq" in r.output

    r = runner.invoke(models_group, ["list", "--json", "--hub", url])
    assert r.exit_code == 0, r.output
    models = json.loads(r.output)
    assert len(models[0]["versions"][0]["bundles"]) == 2
    assert "Models" in runner.invoke(models_group, ["list", "--hub", url]).output

    dev = device_factory(hub.broker_url)
    dev.hello()
    wait_until(lambda: httpx.get(f"{url}/api/v1/devices/{dev.device_id}").status_code == 200)
    r = runner.invoke(devices_group, ["list", "--json", "--hub", url])
    devices = {d["device_id"]: d for d in json.loads(r.output)}
    assert set(devices[dev.device_id]) >= {"device_id", "profile", "online", "state", "model"}
    r = runner.invoke(devices_group, ["show", dev.device_id, "--json", "--hub", url])
    assert json.loads(r.output)["profile"] == "x86-gateway-vnni"

    dev.subscribe("deploy")

    def report() -> None:  # the simulated device installs what it is told to
        from agent import protocol

        d = protocol.decode(protocol.Deployment, dev.wait_for("deploy")[0].payload)
        time.sleep(0.3)
        dev.publish("status", protocol.StatusReport(seq=1, deployment_id=d.deployment_id,
                                                    state="installed", outcome="installed", model=d.model))

    threading.Thread(target=report, daemon=True).start()
    r = runner.invoke(deploy_command, ["tiny:1.0.0", "--device", dev.device_id, "--precision", "int8",
                                       "--wait", "15", "--json", "--hub", url])
    assert r.exit_code == 0, r.output
    dep = json.loads(r.output[r.output.index("{"):])
    assert dep["counts"] == {"installed": 1} and dep["devices"][0]["precision"] == "int8-qdq"


def test_cli_errors_are_one_line(tmp_path: Path) -> None:
    runner = CliRunner()
    r = runner.invoke(models_group, ["list", "--hub", "http://127.0.0.1:9"])
    assert r.exit_code == 1 and "cannot reach the hub" in r.output and "Traceback" not in r.output
    r = runner.invoke(deploy_command, ["tiny:1.0.0", "--device", "x", "--hub", "http://127.0.0.1:9"])
    assert r.exit_code == 1 and "cannot reach the hub" in r.output
