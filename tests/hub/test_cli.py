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


def test_hub_serve_reports_what_kept_it_from_starting_in_one_line(tmp_path: Path) -> None:
    """A database it cannot reach, a broker URL that is not one, a broker port that is
    taken: one "Error:" line each, and the process exits (before: tracebacks from inside
    the web server's start-up, exit 3)."""
    import socket
    import sqlite3

    from hub.cli import hub_group

    runner = CliRunner()
    newer = tmp_path / "newer"  # a database a later hub migrated past what this one knows
    newer.mkdir()
    with sqlite3.connect(newer / "hub.db") as db:
        db.execute("CREATE TABLE alembic_version (version_num VARCHAR(32) PRIMARY KEY)")
        db.execute("INSERT INTO alembic_version VALUES ('0099')")
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    try:
        for args, message in [
            (["--db", "postgresql+psycopg://postgres@127.0.0.1:1/none"],
             "cannot start the hub: cannot use the database postgresql+psycopg://postgres@127.0.0.1:1/none: "),
            (["--broker", "http://127.0.0.1:1883"], "bad hub settings: broker_url: Value error, broker URL must"),
            (["--mqtt-listen", f"127.0.0.1:{taken.getsockname()[1]}"],
             "cannot start the hub: cannot start the embedded MQTT broker on 127.0.0.1:"),
            (["--mqtt-listen", "1883", "--broker", "mqtt://h:1"], "with --broker there is none"),
            (["--mqtt-listen", "host:99999"], "expected [HOST:]PORT"),
            (["--db", "notaurl"], "cannot use the database 'notaurl': not a database URL"),
            (["--db", "postgresql+psycopg://u:pa@ss:w0rdX@127.0.0.1:5432/x"],  # the password never shown
             "cannot use the database 'postgresql+psycopg://***@127.0.0.1:5432/x': not a database URL"),
            (["--db", "mysql+pymysql://u:pw@127.0.0.1/x"], "mysql+pymysql://u:***@127.0.0.1/x: No module named"),
            (["--data-dir", str(newer)], "a version of the hub this one does not know"),
        ]:
            data_dir = [] if "--data-dir" in args else ["--data-dir", str(tmp_path / "hub")]
            r = runner.invoke(hub_group, ["serve", *data_dir, "--port", "0", *args])
            assert r.exit_code in (1, 2) and message in r.output, (args, r.output)
            assert "Traceback" not in r.output and "w0rdX" not in r.output
    finally:
        taken.close()


def test_cli_push_of_a_compile_folder_uploads_what_it_selected(live_hub: tuple[str, Hub], tmp_path: Path) -> None:
    """`compile --out build/` writes every candidate it measured; two of them may share
    (profile, format, precision), e.g. int8 per-channel and per-tensor, which the
    registry keys on. Pushing the folder uploads the selection of each profile only."""
    url, _hub = live_hub
    out = tmp_path / "build"
    out.mkdir()
    chosen = make_bundle(out, precision="int8", seed=1)
    make_bundle(out, precision="int8", seed=2)  # the candidate set aside
    (out / "report.json").write_text(json.dumps({"profiles": {
        "x86-gateway-vnni": {"selected": chosen.name}, "rpi4-arm64": {"selected": None}}}))
    runner = CliRunner()
    r = runner.invoke(models_group, ["push", str(out), "--hub", url])
    assert r.exit_code == 0, r.output
    assert f"selected {chosen.name}" in r.output and "rpi4-arm64: nothing selected" in r.output
    models = json.loads(runner.invoke(models_group, ["list", "--json", "--hub", url]).output)
    (bundle,) = models[0]["versions"][0]["bundles"]
    assert bundle["precision"] == "int8"
    for report, message in [(None, "has no report.json"), ("{", "is not a compile report"),
                            ('{"profiles": {"p": {"selected": "gone.efb"}}}', "lacks bundles its report selected: gone.efb")]:
        (out / "report.json").unlink(missing_ok=True)
        if report is not None:
            (out / "report.json").write_text(report)
        r = runner.invoke(models_group, ["push", str(out), "--hub", url])
        assert r.exit_code == 2 and message in r.output, r.output
