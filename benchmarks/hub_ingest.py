"""Hub telemetry ingestion benchmark: sustained messages/s with no message lost.

    python benchmarks/hub_ingest.py [--generator mosquitto_pub|python] [--devices 100]
        [--publishers 4] [--messages 120000] [--runs 3] [--rate MSG_PER_S] [--ingest-clients N]
        [--read-block BYTES] [--db URL] [--plain-subscriber]

A private Mosquitto (max_inflight_messages 1000, set_tcp_nodelay true, a queue per
client large enough that the broker never drops a QoS 1 message while the hub catches
up), a real hub process (``edgefleet hub serve``, SQLite in its data folder unless
``--db`` names another database) and a load generator publishing ``--messages`` QoS 1
telemetry windows (the agent's ``protocol.Telemetry`` payload, about 350 bytes) from
``--devices`` devices as fast as the broker acknowledges them:

- ``--generator mosquitto_pub`` (the default): one ``mosquitto_pub -l -q 1`` process
  (C, libmosquitto) per device, fed that device's pre-encoded payloads one per line on
  stdin. It costs the shared cores a fraction of what Python publishers do, so the
  figure is the hub's rather than the load generator's. ``protocol.encode`` output is
  compact JSON (a newline in a string is escaped), so a line is exactly one payload.
  With ``-l`` mosquitto_pub publishes each line, and at the end of its input waits for
  the broker's acknowledgement of the last message (PUBACK, QoS 1) before it
  disconnects and exits 0; the broker acknowledges in order, so an exit 0 means every
  line was accepted by the broker. (Message ids are 16-bit, so a device gets at most
  65,535 messages a run; the benchmark refuses more.)
- ``--generator python``: ``--publishers`` processes of paho clients (the method
  before 2026-11-28), each publishing its share of the devices' windows; each costs
  about ten times the CPU per message of mosquitto_pub on the same cores.

The time runs from the first publish to the moment the hub's database holds every row;
the rate is rows stored / that time, and a run that loses a message says so
(``lost``). ``publish_msg_per_s`` is how fast the publishers got their messages
acknowledged by the broker, and ``drain_s`` how long the hub took after the last
acknowledgement: a hub that keeps up has ``drain_s`` near 0, one that does not has
the broker holding a backlog (which, sustained, ends in loss once its queue is full).
With ``--rate R`` the devices offer R messages/s in all, evenly, instead of as fast as
they can: a sustained load, which the hub keeps up with when ``drain_s`` (its lag
behind the publishers at the end) stays near 0 and ``msg_per_s`` near R.
``cpu_us_per_msg`` is the CPU time (user + system) of the hub (or the plain
subscriber), the broker and the load generator during the run, per message: on a
shared machine the least noisy figure of what each part costs.

``--ingest-clients`` sets the hub's ``EDGEFLEET_HUB_INGEST_CLIENTS`` (MQTT clients
sharing the telemetry subscription), ``--read-block`` its
``EDGEFLEET_HUB_MQTT_READ_BLOCK`` (0: paho reads the socket itself). ``--plain-subscriber``
replaces the hub with one paho client (in this process) that only counts what it
receives: the ceiling of broker + load generator + one Python MQTT client here.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import multiprocessing as mp
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hub.localfleet import HubProcess  # noqa: E402
from tests.support import MosquittoBroker, free_port  # noqa: E402

_MAX_PER_DEVICE = 65_535  # mosquitto_pub's 16-bit message ids (see the module docstring)
_STEP_S = 0.1  # --rate: each device's input is written in steps of this many seconds


def _telemetry(seq: int, i: int) -> bytes:
    from agent import protocol

    t = protocol.Telemetry(seq=seq, window_start=1.0 * i, window_end=1.0 * i + 1, model="m:1.0.0",
                           inference_count=10, error_count=0,
                           latency=protocol.LatencyStats(p50_ms=1.0, p95_ms=2.0, max_ms=3.0),
                           cpu_percent=5.0, rss_bytes=1 << 20)
    return protocol.encode(t)


def _split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if k < total % parts else 0) for k in range(parts)]


def _publisher(url: str, index: int, devices: list[str], count: int, seq0: int, start: Any, out: Any) -> None:
    """``--generator python``: one paho client publishing ``count`` windows round-robin
    over ``devices``."""
    import paho.mqtt.client as mqtt

    from agent import topics
    from agent.connection import parse_broker_url

    addr = parse_broker_url(url)
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-pub-{index}-{seq0}")
    c.max_inflight_messages_set(1000)
    c.max_queued_messages_set(0)
    c.connect(addr.host, addr.port)
    c.loop_start()
    msgs = [(topics.device_topic(devices[i % len(devices)], "telemetry"), _telemetry(seq0 + i, i))
            for i in range(count)]
    start.wait()
    t0 = time.monotonic()
    infos = [c.publish(tp, p, qos=1) for tp, p in msgs]
    for info in infos:
        info.wait_for_publish(300)
    out.put((index, time.monotonic() - t0, sum(1 for i in infos if i.is_published())))
    c.disconnect()
    c.loop_stop()


class _PythonLoad:
    """``--publishers`` paho publisher processes; ``--devices`` split between them."""

    def __init__(self, url: str, devices: int, publishers: int, messages: int, seq0: int) -> None:
        ctx = mp.get_context("spawn")
        self.start_evt, self.out = ctx.Event(), ctx.Queue()
        names = [f"bench-{d:04d}" for d in range(devices)]
        groups = [names[k::publishers] for k in range(publishers)]
        self.procs = [ctx.Process(target=_publisher, args=(url, k, groups[k], n, seq0, self.start_evt, self.out))
                      for k, n in enumerate(_split(messages, publishers))]
        for p in self.procs:
            p.start()
        time.sleep(3 + messages / publishers / 20_000)  # publishers connected and payloads built

    def go(self) -> None:
        self.start_evt.set()

    def finish(self) -> tuple[float, int, list[int]]:
        """(seconds to the last broker acknowledgement, messages acknowledged, exit codes)."""
        pubs = [self.out.get(timeout=600) for _ in self.procs]
        for p in self.procs:
            p.join(60)
        return max(s for _, s, _ in pubs), sum(k for _, _, k in pubs), [p.exitcode or 0 for p in self.procs]


class _MosquittoPubLoad:
    """One ``mosquitto_pub -l -q 1`` process per device, fed its payloads on stdin."""

    def __init__(self, binary: str, host: str, port: int, devices: int, messages: int, seq0: int,
                 run: int, rate: float = 0.0) -> None:
        from agent import topics

        self.rate = rate

        counts = _split(messages, devices)
        if max(counts) > _MAX_PER_DEVICE:
            raise SystemExit(f"--messages/--devices must be at most {_MAX_PER_DEVICE} (mosquitto_pub message ids)")
        self.inputs: list[bytes] = []
        self.procs: list[subprocess.Popen[bytes]] = []
        for d, n in enumerate(counts):
            lines = [_telemetry(seq0 + i, i) for i in range(n)]
            if any(b"\n" in ln for ln in lines):
                raise RuntimeError("an encoded payload contains a newline; mosquitto_pub -l would split it")
            self.inputs.append(b"\n".join(lines) + b"\n")
            cmd = [binary, "-h", host, "-p", str(port), "-q", "1", "-l", "-M", "100",
                   "-i", f"bench-pub-{run}-{d}", "-t", topics.device_topic(f"bench-{d:04d}", "telemetry")]
            self.procs.append(subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                               stderr=subprocess.PIPE))
        time.sleep(2)  # connected (each waits on stdin)
        self.t0 = 0.0
        self.ends: list[float] = []
        self._threads: list[threading.Thread] = []

    def _feed(self, p: subprocess.Popen[bytes], data: bytes) -> None:
        assert p.stdin is not None
        if self.rate <= 0:
            p.stdin.write(data)
        else:  # this device's share of --rate, in 0.1 s steps on a fixed schedule
            lines = data.splitlines(keepends=True)
            per_step = self.rate / len(self.procs) * _STEP_S
            k = 0
            while k < len(lines):
                step = int((time.monotonic() - self.t0) / _STEP_S) + 1
                upto = min(len(lines), int(step * per_step))
                if upto > k:
                    p.stdin.write(b"".join(lines[k:upto]))
                    p.stdin.flush()
                    k = upto
                time.sleep(max(0.0, self.t0 + step * _STEP_S - time.monotonic()))
        p.stdin.close()
        p.wait()
        self.ends.append(time.monotonic())

    def go(self) -> None:
        self.t0 = time.monotonic()
        self._threads = [threading.Thread(target=self._feed, args=(p, data), daemon=True)
                         for p, data in zip(self.procs, self.inputs, strict=True)]
        for t in self._threads:
            t.start()

    def finish(self) -> tuple[float, int, list[int]]:
        for t in self._threads:
            t.join(600)
        codes = [p.returncode for p in self.procs]
        for p in self.procs:
            err = p.stderr.read().decode(errors="replace").strip() if p.stderr else ""
            if p.returncode or err:
                print(f"mosquitto_pub {p.args[-1]}: exit {p.returncode}: {err[:300]}", file=sys.stderr)
        acked = sum(len(data.splitlines()) for p, data in zip(self.procs, self.inputs, strict=True)
                    if p.returncode == 0)
        return max(self.ends) - self.t0, acked, codes


class _PlainSubscriber:
    """One paho client on the telemetry wildcard that only counts (``--plain-subscriber``)."""

    def __init__(self, url: str) -> None:
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


class _RowCounter:
    """Telemetry rows stored since :meth:`mark`: counts only ids above the highest id
    seen at the mark, so a poll costs the run's rows, not the table's."""

    def __init__(self, db_url: str) -> None:
        from sqlalchemy import create_engine

        self.engine = create_engine(db_url)
        self.since = 0

    def mark(self) -> None:
        from sqlalchemy import text

        with self.engine.connect() as con:
            self.since = int(con.execute(text("SELECT COALESCE(MAX(id), 0) FROM telemetry")).scalar_one())

    def __call__(self) -> int:
        from sqlalchemy import text

        with self.engine.connect() as con:
            q = text("SELECT COUNT(*) FROM telemetry WHERE id > :since")
            return int(con.execute(q, {"since": self.since}).scalar_one())


def _cpu_s(pid: int) -> float:
    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


def _children_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _machine() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        model = next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), "")
    except OSError:
        model = ""
    return f"{model or platform.processor()}, {os.cpu_count()} CPUs"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--generator", choices=("mosquitto_pub", "python"), default="mosquitto_pub",
                    help="load generator: one mosquitto_pub process per device (C), or paho publisher processes")
    ap.add_argument("--devices", type=int, default=100, help="devices publishing (topics)")
    ap.add_argument("--publishers", type=int, default=4, help="--generator python: publisher processes")
    ap.add_argument("--mosquitto-pub", default=shutil.which("mosquitto_pub") or "/usr/bin/mosquitto_pub")
    ap.add_argument("--messages", type=int, default=120_000, help="per run, over all devices")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--rate", type=float, default=0.0,
                    help="--generator mosquitto_pub: offer this many messages/s in all, evenly (0: as fast as "
                         "the broker takes them); the hub keeps up when drain_s stays near 0")
    ap.add_argument("--ingest-clients", type=int, default=None,
                    help="the hub's EDGEFLEET_HUB_INGEST_CLIENTS (default: the hub's default)")
    ap.add_argument("--read-block", type=int, default=None,
                    help="the hub's EDGEFLEET_HUB_MQTT_READ_BLOCK (0: paho reads the socket itself)")
    ap.add_argument("--db", default=None, help="database URL for the hub (default: SQLite in its data folder)")
    ap.add_argument("--plain-subscriber", action="store_true",
                    help="no hub: one paho subscriber that only counts (the broker/client ceiling)")
    args = ap.parse_args()
    if args.rate and args.generator != "mosquitto_pub":
        ap.error("--rate needs --generator mosquitto_pub")
    work = Path(tempfile.mkdtemp(prefix="hub-ingest-"))
    broker = MosquittoBroker(shutil.which("mosquitto") or "/usr/sbin/mosquitto", work / "mqtt", free_port(),
                             extra_conf="max_queued_messages 10000000\n")
    broker.start()
    assert broker.proc is not None
    env = {} if args.ingest_clients is None else {"EDGEFLEET_HUB_INGEST_CLIENTS": str(args.ingest_clients)}
    if args.read_block is not None:
        env["EDGEFLEET_HUB_MQTT_READ_BLOCK"] = str(args.read_block)
    hub = HubProcess(work / "hub", db_url=args.db, broker_url=broker.url, env=env)
    sub: _PlainSubscriber | None = None
    rates: list[float] = []
    lost_total = 0
    load_avg = [os.getloadavg()[0]]
    try:
        if args.plain_subscriber:
            sub = _PlainSubscriber(broker.url)
            rows: Any = sub.rows
            mark = lambda: None  # noqa: E731
            consumer_cpu = lambda: time.process_time()  # noqa: E731 - this process: subscriber + polling
        else:
            hub.start()
            assert hub.proc is not None
            counter = _RowCounter(args.db or f"sqlite:///{work / 'hub' / 'hub.db'}")
            rows, mark = counter, counter.mark
            hub_pid = hub.proc.pid
            consumer_cpu = lambda: _cpu_s(hub_pid)  # noqa: E731
        for run in range(args.runs):
            seq0 = time.time_ns() // 1000  # unique across runs and invocations (a database may be reused)
            load: _PythonLoad | _MosquittoPubLoad
            if args.generator == "python":
                load = _PythonLoad(broker.url, args.devices, args.publishers, args.messages, seq0)
            else:
                load = _MosquittoPubLoad(args.mosquitto_pub, "127.0.0.1", broker.port, args.devices,
                                         args.messages, seq0, run, args.rate)
            sent = args.messages
            mark()
            before = rows()
            load_avg.append(os.getloadavg()[0])
            cpu0 = (consumer_cpu(), _cpu_s(broker.proc.pid), _children_cpu_s())
            t0 = time.monotonic()
            load.go()
            deadline = t0 + 900
            n = before
            while n - before < sent and time.monotonic() < deadline:
                # Poll slowly while far from done (polling costs the machine being
                # measured), then every 20 ms for the end time.
                time.sleep(0.02 if n - before > 0.97 * sent else 0.25)
                n = rows()
            elapsed = time.monotonic() - t0
            publish_s, acked, codes = load.finish()
            cpu1 = (consumer_cpu(), _cpu_s(broker.proc.pid), _children_cpu_s())
            time.sleep(1)  # anything late (a duplicate would show up as stored > sent)
            got = rows() - before
            rate = min(got, sent) / elapsed
            rates.append(rate)
            lost_total += max(sent - got, 0)
            load_avg.append(os.getloadavg()[0])
            us = [round((b - a) / sent * 1e6, 1) for a, b in zip(cpu0, cpu1, strict=True)]
            print(json.dumps({"run": run, "messages": sent, "acked_by_broker": acked,
                              "stored": got, "lost": sent - got, "seconds": round(elapsed, 2),
                              "msg_per_s": round(rate), "publish_msg_per_s": round(sent / publish_s),
                              "drain_s": round(max(elapsed - publish_s, 0.0), 2),
                              "cpu_us_per_msg": {"subscriber" if sub else "hub": us[0], "broker": us[1],
                                                 "generator": us[2]},
                              "generator_failures": sum(1 for c in codes if c),
                              "load_1min": round(load_avg[-1], 1)}), flush=True)
        print(json.dumps({"generator": args.generator, "devices": args.devices, "rate": args.rate or None,
                          "publishers": args.publishers if args.generator == "python" else args.devices,
                          "ingest_clients": args.ingest_clients, "read_block": args.read_block,
                          "db": "plain-subscriber" if args.plain_subscriber else (args.db or "sqlite"),
                          "median_msg_per_s": round(statistics.median(rates)),
                          "runs_msg_per_s": [round(r) for r in rates], "lost": lost_total,
                          "load_1min": [round(min(load_avg), 1), round(max(load_avg), 1)],
                          "machine": _machine(), "date": dt.datetime.now(dt.UTC).isoformat(timespec="minutes"),
                          "command": " ".join(["python", *sys.argv])}), flush=True)
    finally:
        if sub is not None:
            sub.stop()
        hub.stop()
        broker.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
