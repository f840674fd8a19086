"""Hub rollout benchmark: one 100% wave of a ~1 MB bundle to N simulated devices.

    python benchmarks/hub_rollout.py --devices 100 [--runs 3] [--processes 2]

A private Mosquitto (max_inflight_messages 1000, set_tcp_nodelay true), a real hub
process on SQLite, and N real agents (``hub.sim``, factory-installed with v1, no
inference traffic). Each run creates a campaign ``--waves 100`` for a fresh version
and times from the create request to the campaign's ``completed`` state (every
device downloaded over MQTT, verified, installed, self-tested, activated, passed a
0 s health window and reported). Also reports the hub's RSS with N devices known.
Prints one JSON line per run and a summary with medians.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx  # noqa: E402
import psutil  # noqa: E402

from hub.localfleet import HubProcess, wait_until  # noqa: E402
from hub.sim import SimConfig, SimFleet  # noqa: E402
from tests.hub.bundles import make_bundle  # noqa: E402
from tests.support import MosquittoBroker, free_port  # noqa: E402


def _cpu() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    return next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")),
                platform.processor())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", type=int, default=100)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--bundle-mb", type=float, default=1.0)
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--agents-per-process", type=int, default=SimConfig.max_agents_per_process,
                    help="most agents in one sim process (more processes are started as needed)")
    ap.add_argument("--sim-dir", type=Path, default=None,
                    help="where the simulated devices keep their data (default: beside the hub's, on disk); "
                         "e.g. a folder in /dev/shm, to keep 1,000 devices' fsyncs off the one shared disk")
    ap.add_argument("--idle-s", type=float, default=0,
                    help="before the first campaign, measure the idle fleet's CPU for this long")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="hub-rollout-"))
    sim_data = Path(tempfile.mkdtemp(prefix="sim-", dir=args.sim_dir)) if args.sim_dir else work / "sim"
    broker = MosquittoBroker(shutil.which("mosquitto") or "/usr/sbin/mosquitto", work / "mqtt", free_port())
    broker.start()
    hub = HubProcess(work / "hub", broker_url=broker.url,
                     env={"EDGEFLEET_CAMPAIGN_TICK_S": "0.2", "EDGEFLEET_DEPLOYMENT_HEALTH_WINDOW_S": "0"})
    sim: SimFleet | None = None
    try:
        hub.start()
        http = httpx.Client(base_url=hub.url, timeout=60)
        pad = int(args.bundle_mb * 1024 * 1024)
        bundles = [make_bundle(work / "bundles", version=f"{v}.0.0", seed=v, padding=pad if v > 1 else 0)
                   for v in range(1, args.runs + 2)]
        for p in bundles:
            with open(p, "rb") as fh:
                r = http.post("/api/v1/models", files={"bundle": (p.name, fh, "application/octet-stream")})
                r.raise_for_status()
        rss_empty = psutil.Process(hub.proc.pid).memory_info().rss  # type: ignore[union-attr]
        sim = SimFleet(SimConfig(broker_url=broker.url, devices=args.devices, data_dir=sim_data,
                                 trust_root=hub.root_json(), processes=args.processes,
                                 preinstall=(bundles[0],), telemetry_interval=10.0, infer_interval=0,
                                 max_agents_per_process=args.agents_per_process))
        t0 = time.monotonic()
        sim.start(timeout=args.timeout)

        def online() -> bool:
            devs = http.get("/api/v1/devices").json()
            return sum(1 for d in devs if d["online"] and d["model"] == "tiny:1.0.0") >= args.devices

        wait_until(online, args.timeout, 0.5, "devices online")
        print(json.dumps({"fleet_start_s": round(time.monotonic() - t0, 1)}), flush=True)
        time.sleep(2)  # the devices' hello, presence and status have been ingested
        rss_fleet = psutil.Process(hub.proc.pid).memory_info().rss  # type: ignore[union-attr]
        procs = {"hub": [hub.proc.pid], "broker": [broker.proc.pid], "sim": sim.pids()}  # type: ignore[union-attr]

        def cpu() -> dict[str, float]:
            """CPU seconds (user + system) used so far by the hub, the broker and the sims."""
            out = {}
            for k, pids in procs.items():
                t = 0.0
                for pid in pids:
                    try:
                        ct = psutil.Process(pid).cpu_times()
                        t += ct.user + ct.system
                    except psutil.Error:
                        pass
                out[k] = t
            return out

        def cpu_since(c0: dict[str, float], seconds: float) -> dict[str, float]:
            c1 = cpu()
            return {f"{k}_cpu_s": round(c1[k] - c0[k], 1) for k in c0} | {"wall_s": round(seconds, 1)}

        if args.idle_s > 0:
            c0, t0 = cpu(), time.monotonic()
            time.sleep(args.idle_s)
            print(json.dumps({"idle": cpu_since(c0, time.monotonic() - t0),
                              "hub_rss_mb": round(psutil.Process(hub.proc.pid).memory_info().rss / 2**20, 1),  # type: ignore[union-attr]
                              "load": [round(x, 1) for x in os.getloadavg()]}), flush=True)
        times = []
        for run in range(args.runs):
            version = f"{run + 2}.0.0"
            c0 = cpu()
            load0 = os.getloadavg()[0]
            t0 = time.monotonic()
            r = http.post("/api/v1/campaigns", json={"model": f"tiny:{version}", "select": "all", "waves": "100"})
            r.raise_for_status()
            cid = r.json()["id"]

            # Poll the summaries (state and counts): the full campaign lists every
            # device, which at 1,000 devices ten times a second would load the hub
            # being measured.
            def done(cid: str = cid) -> dict | None:
                c = next(c for c in http.get("/api/v1/campaigns", params={"limit": 5}).json() if c["id"] == cid)
                return c if c["state"] in ("completed", "paused", "rolled_back", "aborted") else None

            wait_until(done, args.timeout, 0.1, "campaign")
            dt_s = time.monotonic() - t0
            c = http.get(f"/api/v1/campaigns/{cid}").json()
            times.append(dt_s)
            why = Counter((d["detail"] or "")[:90] for d in c["devices"] if d["state"] != "updated")
            print(json.dumps({"run": run, "version": version, "seconds": round(dt_s, 2), "state": c["state"],
                              "counts": c["counts"], "failures": dict(why), "cpu": cpu_since(c0, dt_s),
                              "load_before": round(load0, 1), "load_after": round(os.getloadavg()[0], 1)}),
                  flush=True)
        rss = psutil.Process(hub.proc.pid).memory_info().rss  # type: ignore[union-attr]
        summary = {
            "devices": args.devices, "bundle_bytes": bundles[1].stat().st_size, "runs": args.runs,
            "median_s": round(statistics.median(times), 2), "min_s": round(min(times), 2),
            "hub_rss_empty_mb": round(rss_empty / 2**20, 1),
            "hub_rss_fleet_online_mb": round(rss_fleet / 2**20, 1),
            # registered, online devices: what the hub keeps per device, not rollout working memory
            "hub_rss_per_1000_devices_mb": round((rss_fleet - rss_empty) / 2**20 * 1000 / args.devices, 1),
            "hub_rss_after_runs_mb": round(rss / 2**20, 1),
            "cpu": _cpu(), "cores": psutil.cpu_count(), "date": dt.date.today().isoformat(),
            "command": " ".join(["python", *sys.argv]),
        }
        print(json.dumps(summary), flush=True)
    finally:
        if sim is not None:
            sim.stop(timeout=20)  # graceful stops of 1,000 agents are not what is measured
        hub.stop()
        broker.stop()
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(sim_data, ignore_errors=True)


if __name__ == "__main__":
    main()
