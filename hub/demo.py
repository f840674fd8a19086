"""``edgefleet demo``: the whole product on one machine in a few minutes.

Trains a small CNN on scikit-learn's bundled digits, compiles it for two device
profiles, starts a hub (embedded broker, SQLite in a temporary folder) and five agents
as real processes, deploys to all of them, runs predictions on every device through
its localhost V2 endpoint, and prints accuracy per device and the telemetry the hub
received.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

import click
import httpx
import numpy as np
from rich.console import Console
from rich.table import Table

from agent.v2 import V2Error
from hub.localfleet import AgentProcess, HubProcess, free_port, wait_until

__all__ = ["demo_command", "run_demo"]

PROFILES = ("x86-gateway-vnni", "rpi4-arm64")
MODEL = "digits-cnn"
VERSION = "1.0.0"


def run_demo(workdir: Path, devices: int = 5, console: Console | None = None) -> dict:
    """Run the demo in ``workdir``; returns a summary (used by the tests)."""
    from agent.localapi import InferenceClient
    from agent.profiles import load_profile
    from compiler.demo_models import export_pt2, train_digits_cnn, write_calib_eval
    from compiler.pipeline import CompileOptions, compile_model

    # Piped output gets 120 columns rather than rich's 80 so the tables stay readable.
    con = console or Console(width=None if sys.stdout.isatty() else 120)
    t_start = time.monotonic()
    summary: dict = {}

    with con.status("[1/6] training a small CNN on scikit-learn digits") as status:
        module, x_tr, _y_tr, x_te, y_te = train_digits_cnn(seed=0)
        pt2 = export_pt2(module, x_tr, workdir / "digits-cnn.pt2")
        calib, ev = write_calib_eval(workdir, x_tr, x_te, y_te)
        con.log(f"trained {MODEL}: {len(x_tr)} training rows, exported {pt2.name}")

        status.update(f"[2/6] compiling for {', '.join(PROFILES)}")
        report = compile_model(pt2, [load_profile(p) for p in PROFILES], calib, ev,
                               workdir / "compiled", CompileOptions(name=MODEL, version=VERSION))
        table = Table(title="compiled candidates (this host)")
        for col in ("profile", "format", "precision", "technique", "size", "p50 ms", "accuracy", "selected"):
            table.add_column(col)
        for c in report.candidates:
            table.add_row(c.profile, c.format, c.precision, c.technique, f"{c.size_bytes / 1024:.0f} KiB",
                          f"{c.latency_ms_p50:.3f}" if c.latency_ms_p50 is not None else "-",
                          f"{c.accuracy:.4f}" if c.accuracy is not None else "-",
                          "yes" if c.selected else "")
        con.print(table)

        status.update("[3/6] starting the hub (embedded broker, SQLite) and agents")
        hub = HubProcess(workdir / "hub").start()
        broker = hub.broker
        agents: list[AgentProcess] = []
        try:
            client = httpx.Client(base_url=hub.url, timeout=30)
            # Push what the compiler selected for each profile.
            for c in (c for c in report.candidates if c.selected):
                with open(workdir / "compiled" / c.bundle, "rb") as fh:
                    r = client.post("/api/v1/models", files={"file": (c.bundle, fh, "application/octet-stream")})
                    r.raise_for_status()
            for i in range(devices):
                a = AgentProcess(
                    device_id=f"demo-{i + 1:02d}", profile=PROFILES[i % len(PROFILES)], broker_url=broker,
                    data_dir=workdir / "agents" / f"demo-{i + 1:02d}", trust_root=hub.root_json(),
                    api_port=free_port(), telemetry_interval=2.0, tags=["demo"],
                )
                agents.append(a.start())
            ids = [a.device_id for a in agents]
            wait_until(lambda: _online(client, ids), 60, 0.25, "agents to come online")
            con.log(f"hub at {hub.url}, broker {broker}, {devices} agents online")

            status.update(f"[4/6] deploying {MODEL}:{VERSION} to {devices} devices")
            r = client.post("/api/v1/deployments", json={"model": f"{MODEL}:{VERSION}", "devices": ids})
            r.raise_for_status()
            dep_id = r.json()["id"]
            dep = wait_until(lambda: _finished(client, dep_id, devices), 120, 0.25, "the deployment")
            con.log(f"deployment {dep_id}: {dep['counts']}")

            status.update("[5/6] running predictions on every device")
            acc_table = Table(title=f"predictions on each device ({len(x_te)} held-out digits)")
            for col in ("device", "profile", "model", "bundle", "accuracy", "p50 ms / call"):
                acc_table.add_column(col, no_wrap=True)
            devs = {d["device_id"]: d for d in client.get("/api/v1/devices").json()}
            accs = {}
            for a in agents:
                ic = InferenceClient(a.api_url)
                meta = ic.metadata(MODEL)
                in_name, out_name = meta["inputs"][0]["name"], meta["outputs"][0]["name"]
                # Some bundles (TFLite from litert-torch) have a fixed batch dimension.
                fixed = meta["inputs"][0]["shape"][0]
                step = 32 if fixed == -1 else fixed
                preds, lat = [], []
                for j in range(0, len(x_te), step):
                    t0 = time.perf_counter()
                    out = ic.infer(MODEL, {in_name: x_te[j:j + step]})
                    lat.append((time.perf_counter() - t0) * 1000)
                    preds.append(out[out_name].argmax(axis=1))
                acc = float((np.concatenate(preds) == y_te).mean())
                accs[a.device_id] = acc
                sel = next(c for c in report.candidates if c.profile == a.profile and c.selected)
                acc_table.add_row(a.device_id, a.profile, devs[a.device_id]["model"] or "-",
                                  f"{sel.format} {sel.precision}", f"{acc:.4f}", f"{np.median(lat):.2f}")
            con.print(acc_table)

            status.update("[6/6] waiting for telemetry")
            wait_until(lambda: _telemetry(client, ids), 30, 0.5, "telemetry from every device")
            tel = Table(title="telemetry received by the hub (the window with the most inferences, per device)")
            for col in ("device", "model", "inferences", "errors", "p50 ms", "p95 ms", "RSS MiB"):
                tel.add_column(col, no_wrap=True)
            for dev_id in ids:
                rows = client.get("/api/v1/telemetry", params={"device_id": dev_id}).json()
                busiest = max(rows, key=lambda r: (r["inference_count"], r["seq"]))
                tel.add_row(dev_id, busiest["model"] or "-", str(busiest["inference_count"]),
                            str(busiest["error_count"]), _ms(busiest["p50_ms"]), _ms(busiest["p95_ms"]),
                            f"{(busiest.get('rss_bytes') or 0) / 2**20:.0f}")
            con.print(tel)
            summary = {"deployment": dep, "accuracy": accs, "seconds": time.monotonic() - t_start}
        finally:
            for a in agents:
                a.stop()
            hub.stop()
    con.log(f"demo finished in {time.monotonic() - t_start:.0f}s")
    return summary


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def _online(client: httpx.Client, ids: list[str]) -> bool:
    devs = {d["device_id"]: d for d in client.get("/api/v1/devices").json()}
    return all(i in devs and devs[i]["online"] for i in ids)


def _finished(client: httpx.Client, dep_id: str, n: int) -> dict | None:
    dep = client.get(f"/api/v1/deployments/{dep_id}").json()
    done = sum(v for k, v in dep["counts"].items() if k in ("installed", "failed", "rolled_back", "rejected", "skipped"))
    return dep if done >= n else None


def _telemetry(client: httpx.Client, ids: list[str]) -> bool:
    for dev_id in ids:
        rows = client.get("/api/v1/telemetry", params={"device_id": dev_id}).json()
        if not any(r["inference_count"] > 0 for r in rows):
            return False
    return True


@click.command("demo")
@click.option("--devices", default=5, show_default=True, help="How many agents to start.")
@click.option("--keep", is_flag=True, help="Keep the working folder (printed at the end).")
def demo_command(devices: int, keep: bool) -> None:
    """Train, compile, sign, push and run a model on a local fleet, end to end."""
    workdir = Path(tempfile.mkdtemp(prefix="edgefleet-demo-"))
    try:
        summary = run_demo(workdir, devices)
    except (TimeoutError, RuntimeError, httpx.HTTPError, V2Error) as e:
        raise click.ClickException(f"demo failed: {e} (files kept in {workdir})") from e
    finally:
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
    if keep:
        click.echo(f"files kept in {workdir}")
    counts = summary["deployment"]["counts"]
    if counts.get("installed", 0) != devices:
        raise click.ClickException(f"not every device installed the model: {counts}")
