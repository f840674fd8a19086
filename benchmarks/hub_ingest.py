"""Hub telemetry ingestion benchmark: sustained messages/s with no message lost.

    python benchmarks/hub_ingest.py [--publishers 4] [--messages 120000] [--runs 3]
        [--ingest-clients N] [--read-block BYTES] [--db URL] [--plain-subscriber]

A private Mosquitto (max_inflight_messages 1000, set_tcp_nodelay true, a queue per
client large enough that the broker never drops a QoS 1 message while the hub catches
up), a real hub process (``edgefleet hub serve``, SQLite in its data folder unless
``--db`` names another database) and ``--publishers`` processes, each publishing its
share of ``--messages`` QoS 1 telemetry windows (the agent's ``protocol.Telemetry``
payload, about 280 bytes) for 25 devices as fast as the broker acknowledges them.

The time runs from the first publish to the moment the hub's database holds every row;
the rate is rows stored / that time, and a run that loses a message says so
(``lost``). ``publish_msg_per_s`` is how fast the publishers got their messages
acknowledged by the broker, and ``drain_s`` how long the hub took after the last
acknowledgement: a hub that keeps up has ``drain_s`` near 0, one that does not has
the broker holding a backlog (which, sustained, ends in loss once its queue is full).

``--ingest-clients`` sets the hub's ``EDGEFLEET_HUB_INGEST_CLIENTS`` (MQTT clients
sharing the telemetry subscription), ``--read-block`` its
``EDGEFLEET_HUB_MQTT_READ_BLOCK`` (0: paho reads the socket itself, as before). ``--plain-subscriber`` replaces the hub with one
paho client that only counts what it receives: the ceiling of broker + publishers +
one Python MQTT client on this machine.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import multiprocessing as mp
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hub.localfleet import HubProcess  # noqa: E402
from tests.support import MosquittoBroker, free_port  # noqa: E402

_DEVICES_PER_PUBLISHER = 25


def _publisher(url: str, index: int, count: int, seq0: int, start: Any, out: Any) -> None:
    import paho.mqtt.client as mqtt

    from agent import protocol, topics
    from agent.connection import parse_broker_url

    addr = parse_broker_url(url)
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-pub-{index}-{seq0}")
    c.max_inflight_messages_set(1000)
    c.max_queued_messages_set(0)
    c.connect(addr.host, addr.port)
    c.loop_start()
    msgs = []
    for i in range(count):
        dev = f"bench-{index:02d}-{i % _DEVICES_PER_PUBLISHER:03d}"
        t = protocol.Telemetry(seq=seq0 + i, window_start=1.0 * i, window_end=1.0 * i + 1, model="m:1.0.0",
                               inference_count=10, error_count=0,
                               latency=protocol.LatencyStats(p50_ms=1.0, p95_ms=2.0, max_ms=3.0),
                               cpu_percent=5.0, rss_bytes=1 << 20)
        msgs.append((topics.device_topic(dev, "telemetry"), protocol.encode(t)))
    start.wait()
    t0 = time.monotonic()
    infos = [c.publish(tp, p, qos=1) for tp, p in msgs]
    for info in infos:
        info.wait_for_publish(300)
    out.put((index, time.monotonic() - t0, sum(1 for i in infos if i.is_published())))
    c.disconnect()
    c.loop_stop()


class _PlainSubscriber:
    """One paho client on the telemetry wildcard that only counts (``--plain-subscriber``)."""

    def __init__(self, url: str) -> None:
        import threading

        import paho.mqtt.client as mqtt

        from agent import topics
        from agent.connection import parse_broker_url

        self.n = 0
        self._lock = threading.Lock()
        addr = parse_broker_url(url)
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-sub-{os.getpid()}")
        self.c.max_inflight_messages_set(1000)
        ready = threading.Event()

        def on_connect(c: Any, _u: Any, _f: Any, _r: Any, _p: Any) -> None:
            c.subscribe(topics.device_wildcard("telemetry"), 1)

        def on_subscribe(*_a: Any) -> None:
            ready.set()

        def on_message(*_a: Any) -> None:
            with self._lock:
                self.n += 1

        self.c.on_connect, self.c.on_subscribe, self.c.on_message = on_connect, on_subscribe, on_message
        self.c.connect(addr.host, addr.port)
        self.c.loop_start()
        ready.wait(10)

    def rows(self) -> int:
        return self.n

    def stop(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def _row_counter(db_url: str) -> Any:
    from sqlalchemy import create_engine, text

    engine = create_engine(db_url)

    def rows() -> int:
        with engine.connect() as con:
            return int(con.execute(text("SELECT COUNT(*) FROM telemetry")).scalar_one())

    return rows


def _machine() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        model = next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), "")
    except OSError:
        model = ""
    return f"{model or platform.processor()}, {os.cpu_count()} CPUs"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--publishers", type=int, default=4)
    ap.add_argument("--messages", type=int, default=120_000, help="per run, over all publishers")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--ingest-clients", type=int, default=None,
                    help="the hub's EDGEFLEET_HUB_INGEST_CLIENTS (default: the hub's default)")
    ap.add_argument("--read-block", type=int, default=None,
                    help="the hub's EDGEFLEET_HUB_MQTT_READ_BLOCK (0: paho reads the socket itself)")
    ap.add_argument("--db", default=None, help="database URL for the hub (default: SQLite in its data folder)")
    ap.add_argument("--plain-subscriber", action="store_true",
                    help="no hub: one paho subscriber that only counts (the broker/client ceiling)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="hub-ingest-"))
    broker = MosquittoBroker(shutil.which("mosquitto") or "/usr/sbin/mosquitto", work / "mqtt", free_port(),
                             extra_conf="max_queued_messages 10000000\n")
    broker.start()
    env = {} if args.ingest_clients is None else {"EDGEFLEET_HUB_INGEST_CLIENTS": str(args.ingest_clients)}
    if args.read_block is not None:
        env["EDGEFLEET_HUB_MQTT_READ_BLOCK"] = str(args.read_block)
    hub = HubProcess(work / "hub", db_url=args.db, broker_url=broker.url, env=env)
    sub: _PlainSubscriber | None = None
    rates: list[float] = []
    lost_total = 0
    try:
        if args.plain_subscriber:
            sub = _PlainSubscriber(broker.url)
            rows = sub.rows
        else:
            hub.start()
            rows = _row_counter(args.db or f"sqlite:///{work / 'hub' / 'hub.db'}")
        ctx = mp.get_context("spawn")
        for run in range(args.runs):
            per = args.messages // args.publishers
            sent = per * args.publishers
            start, out = ctx.Event(), ctx.Queue()
            procs = [ctx.Process(target=_publisher, args=(broker.url, i, per, (run + 1) * 10_000_000, start, out))
                     for i in range(args.publishers)]
            for p in procs:
                p.start()
            time.sleep(3 + per / 20_000)  # publishers connected and payloads built
            before = rows()
            t0 = time.monotonic()
            start.set()
            deadline = t0 + 600
            n = before
            while n - before < sent and time.monotonic() < deadline:
                time.sleep(0.05)
                n = rows()
            elapsed = time.monotonic() - t0
            pubs = [out.get(timeout=120) for _ in procs]
            for p in procs:
                p.join(60)
            time.sleep(1)  # anything late (a duplicate would show up as stored > sent)
            got = rows() - before
            publish_s = max(s for _, s, _ in pubs)
            rate = min(got, sent) / elapsed
            rates.append(rate)
            lost_total += max(sent - got, 0)
            print(json.dumps({"run": run, "messages": sent, "acked_by_broker": sum(k for _, _, k in pubs),
                              "stored": got, "lost": sent - got, "seconds": round(elapsed, 2),
                              "msg_per_s": round(rate), "publish_msg_per_s": round(sent / publish_s),
                              "drain_s": round(max(elapsed - publish_s, 0.0), 2)}), flush=True)
        print(json.dumps({"publishers": args.publishers, "ingest_clients": args.ingest_clients,
                          "read_block": args.read_block,
                          "db": "plain-subscriber" if args.plain_subscriber else (args.db or "sqlite"),
                          "median_msg_per_s": round(statistics.median(rates)),
                          "runs_msg_per_s": [round(r) for r in rates], "lost": lost_total,
                          "machine": _machine(), "date": dt.date.today().isoformat(),
                          "command": " ".join(["python", *sys.argv])}), flush=True)
    finally:
        if sub is not None:
            sub.stop()
        hub.stop()
        broker.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
