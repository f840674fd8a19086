"""Serving under change: hot swaps under load, bad models, and a long offline period."""

from __future__ import annotations

import bisect
import functools
import json
import os
import pwd
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import paho.mqtt.client as mqtt
import pytest
from onnx import TensorProto, helper, numpy_helper

from agent import topics
from agent.bundle import unpack, write_bundle
from agent.profiles import profiles_dir
from agent.protocol import Telemetry, decode
from agent.runtimes.base import LoadedModel
from agent.serving import OBSERVE_CHUNK, ModelServer, WindowStats
from agent.spool import Priority, Spool
from agent.trust import TargetCustom
from tests.support import free_port, linear_bundle, owns_installed_libraries

pytestmark = pytest.mark.slow
X = np.linspace(-1, 1, 8, dtype=np.float32).reshape(2, 4)
BODY = json.dumps({"inputs": [{"name": "input", "shape": [2, 4], "datatype": "FP32",
                               "data": X.ravel().tolist()}]})


# The load generator runs in its own process: the agent under test serves from this
# one, and a client thread here would share its GIL (and slow it). The child keeps a
# fixed schedule (request k is due at start + k/rate) over several keep-alive
# connections, so a slow answer delays the requests behind it on that connection only,
# and the backlog is sent late rather than dropped. Standard library only: it starts in
# milliseconds.
_LOAD_CLIENT = r"""
import http.client, json, sys, threading, time

port, rate, connections, body = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
headers = {"Content-Type": "application/json"}
stop = threading.Event()
lock = threading.Lock()
next_slot = 0
records = []  # [due, sent, ok, shape and data, or the error]


def ask(conn):
    conn.request("POST", "/v2/models/lin/infer", body, headers)
    resp = conn.getresponse()
    data = resp.read()
    if resp.status != 200:
        return False, f"HTTP {resp.status}: {data[:200]!r}"
    out = json.loads(data)["outputs"][0]
    return True, [out["shape"], out["data"]]


def worker(conn):
    global next_slot
    while True:
        with lock:
            k, next_slot = next_slot, next_slot + 1
        due = start + k / rate
        if stop.wait(max(due - time.monotonic(), 0)):
            return
        sent = time.monotonic()
        try:
            ok, detail = ask(conn)
        except (OSError, http.client.HTTPException) as e:
            ok, detail = False, repr(e)
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        records.append([due, sent, ok, detail])


conns = [http.client.HTTPConnection("127.0.0.1", port, timeout=10) for _ in range(connections)]
for c in conns:
    assert ask(c)[0], "warm-up request failed"
start = time.monotonic()
threads = [threading.Thread(target=worker, args=(c,)) for c in conns]
for t in threads:
    t.start()
print("ready", flush=True)
sys.stdin.readline()
stop.set()
for t in threads:
    t.join()
json.dump(records, sys.stdout)
"""


class Load:
    """Sends ``rate`` requests/s to the local V2 endpoint, from another process over
    ``connections`` keep-alive connections, until the ``with`` block ends; then holds
    every answer: ``ok``, ``failed``, ``outputs``, and when each request was sent
    (``sent``, in ``time.monotonic()`` seconds: CLOCK_MONOTONIC, the same clock in
    every process) and how late against its schedule (``lag``)."""

    def __init__(self, port: int, rate: float, connections: int = 4):
        self.port, self.rate, self.connections = port, rate, connections
        self.ok = 0
        self.failed: list[str] = []
        self.outputs: list[np.ndarray] = []
        self.sent: list[float] = []
        self.lag: list[float] = []
        self._proc: subprocess.Popen | None = None

    def __enter__(self) -> Load:
        self._proc = subprocess.Popen(
            [sys.executable, "-c", _LOAD_CLIENT, str(self.port), str(self.rate), str(self.connections), BODY],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline()
        if line.strip() != "ready":
            self._proc.kill()
            raise RuntimeError(f"the load generator did not start: {line!r}")
        return self

    def __exit__(self, *exc) -> None:
        assert self._proc is not None
        out, _ = self._proc.communicate("stop\n", timeout=30)
        for due, sent, ok, detail in sorted(json.loads(out), key=lambda r: r[1]):
            self.sent.append(sent)
            self.lag.append(sent - due)
            if ok:
                shape, data = detail
                self.outputs.append(np.asarray(data, np.float32).reshape(shape))
                self.ok += 1
            else:
                self.failed.append(detail)

    def sent_between(self, t0: float, t1: float) -> int:
        """How many requests were sent from ``t0`` to ``t1`` (``time.monotonic()``)."""
        return bisect.bisect_right(self.sent, t1) - bisect.bisect_left(self.sent, t0)


def _matches_one_of(out: np.ndarray, models: list[tuple[np.ndarray, np.ndarray]]) -> bool:
    return any(np.allclose(out, X @ w + b, rtol=1e-5, atol=1e-5) for w, b in models)


def test_ten_hot_swaps_under_500_requests_per_second(bench):
    """Ten activations while a client sends over 500 requests/s (550 scheduled, so that
    a noisy machine does not make the check marginal): every request is answered by one
    of the deployed models, and the rate holds over the whole period of the swaps."""
    port = free_port()
    a = bench.agent(api_port=port)
    tp, m, w, b = bench.bundle("1.0.0", seed=0)
    bench.deploy("dev1", "d0", tp, m.ref)
    assert bench.wait_for(a, "d0") == "installed"
    models = [(w, b)]
    with Load(port, 550) as load:
        t0 = time.monotonic()
        for i in range(1, 11):
            tp, m, w, b = bench.bundle(f"1.0.{i}", seed=i)
            models.append((w, b))
            bench.deploy("dev1", f"d{i}", tp, m.ref, health_window_s=0.2)
            assert bench.wait_for(a, f"d{i}") == "installed"
        t1 = time.monotonic()
        time.sleep(0.1)  # the load goes on past the last swap
    rate = load.sent_between(t0, t1) / (t1 - t0)
    print(f"{load.sent_between(t0, t1)} requests sent in the {t1 - t0:.1f} s of the swaps ({rate:.0f}/s), "
          f"{len(load.sent)} in all, {len(load.failed)} failed, most behind schedule {max(load.lag) * 1e3:.0f} ms")
    assert load.sent[0] < t0 and load.sent[-1] > t1, "the load did not cover every swap"
    assert rate >= 500
    assert load.failed == []
    assert load.ok == len(load.sent) and all(_matches_one_of(o, models) for o in load.outputs)
    assert a.model_ref == "lin:1.0.10"


@pytest.mark.skipif(not owns_installed_libraries(),
                    reason="the kernel pages out only files the process owns; these belong to another user")
def test_a_memory_release_under_500_requests_per_second_fails_none(bench):
    port = free_port()
    a = bench.agent(api_port=port, release_memory=True)
    tp, m, w, b = bench.bundle("1.0.0", seed=0)
    bench.deploy("dev1", "d0", tp, m.ref)
    assert bench.wait_for(a, "d0") == "installed"
    with Load(port, 500) as load:
        for _ in range(3):
            time.sleep(0.3)
            a.released = None
            a._release_memory()
            assert a.released is not None and a.released.ranges > 0
        time.sleep(0.3)
    assert load.failed == [] and load.ok > 0
    assert all(_matches_one_of(o, [(w, b)]) for o in load.outputs)


@functools.lru_cache(maxsize=1)
def _slow_model(layers: int = 40, width: int = 1024) -> bytes:
    """~42M multiply-adds per row: well over a 2 ms budget on any CPU we run on."""
    rng = np.random.default_rng(0)
    nodes, inits = [], []
    prev = "input"
    dims = [4] + [width] * layers + [3]
    for i in range(len(dims) - 1):
        w = (rng.normal(size=(dims[i], dims[i + 1])) / np.sqrt(dims[i])).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"W{i}"))
        out = "logits" if i == len(dims) - 2 else f"h{i}"
        nodes.append(helper.make_node("MatMul", [prev, f"W{i}"], [out]))
        prev = out
    g = helper.make_graph(nodes, "slow", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 4])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m.SerializeToString()


def test_bad_models_never_interrupt_the_old_one(bench, tmp_path: Path):
    """Failing self-test, unloadable model, over the latency budget: none goes live."""
    pdir = tmp_path / "profiles"
    pdir.mkdir()
    text = (profiles_dir() / "x86-gateway-vnni.toml").read_text()
    (pdir / "tight.toml").write_text(text.replace('name = "x86-gateway-vnni"', 'name = "tight"')
                                     .replace("latency_budget_ms = 20.0", "latency_budget_ms = 2.0"))
    port = free_port()
    a = bench.agent(api_port=port, profile="tight", profiles_dir=pdir)
    tp, m, w, b = bench.bundle("1.0.0", seed=0, profile="tight")
    bench.deploy("dev1", "good", tp, m.ref)
    assert bench.wait_for(a, "good") == "installed"
    cases = {
        "selftest": dict(bad_selftest=True),
        "load": dict(model_bytes=b"\x08\x07not-an-onnx-model"),
        "selftest-latency": dict(weights=None, model_bytes=None),
    }
    with Load(port, 200) as load:
        for i, (kind, kw) in enumerate(cases.items(), start=1):
            if kind == "selftest-latency":
                path = bench.tmp / "slow.efb"
                man, _sha, _w, _b = linear_bundle(path, version=f"1.1.{i}", profile="tight",
                                                  model_bytes=_slow_model(), bad_selftest=False)
                # The self-test vectors must come from the slow model itself.
                sess = ort.InferenceSession(_slow_model())
                x = np.random.default_rng(0).normal(size=(8, 4)).astype(np.float32)
                ub = unpack(path, bench.tmp / "slow-unpacked")
                fields = ub.manifest.model_dump(mode="json", exclude={"members"})
                write_bundle(path, manifest=fields, model=_slow_model(), selftest_inputs={"input": x},
                             selftest_outputs={"logits": sess.run(None, {"input": x})[0]},
                             reference=ub.reference())
                tpb = bench.repo.add_bundle(path, TargetCustom(name="lin", version=f"1.1.{i}", profile="tight",
                                                               format="onnx", precision="fp32"))
                ref = f"lin:1.1.{i}"
            else:
                tpb, mb, *_ = bench.bundle(f"1.1.{i}", seed=i, profile="tight", **kw)
                ref = mb.ref
            bench.deploy("dev1", f"bad-{kind}", tpb, ref)
            assert bench.wait_for(a, f"bad-{kind}") == "failed"
            want = "latency" if kind == "selftest-latency" else kind
            assert a.record.error_kind == ("selftest" if want == "latency" else want), a.record.error
            if want == "latency":
                assert "over the profile budget" in a.record.error
    assert load.failed == []
    assert load.ok > 0 and all(_matches_one_of(o, [(w, b)]) for o in load.outputs)
    assert a.model_ref == "lin:1.0.0"


def _until(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def test_two_hours_offline_spool_stays_bounded_and_delivers_in_order(mosquitto, bench_factory, monkeypatch):
    """Telemetry every 10 s for 2 h, compressed 1000x: 720 windows while the broker is down.

    Every telemetry record the agent queues is counted as it is queued, and a subscriber
    whose session outlives the outage (subscribed before it, on a broker that keeps
    sessions and queued messages across its restart) sees every one the broker got. So
    each record is accounted for: received, in order and once, or counted as dropped."""
    # Mosquitto started as root otherwise runs as the user "mosquitto", which may not
    # write the test's folder; naming this process's user keeps it (a no-op for others).
    mosquitto.stop()
    mosquitto.extra_conf += (f"persistence true\npersistence_location {mosquitto.workdir}/\n"
                             f"user {pwd.getpwuid(os.getuid()).pw_name}\n")
    mosquitto.start()
    bench = bench_factory()
    bound = 64 * 1024
    topic = topics.device_topic("dev1", "telemetry")

    received: list[Telemetry] = []
    sessions: list[bool] = []  # session_present at each connection of the subscriber
    subscribed = threading.Event()
    sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="telemetry-watcher", clean_session=False)
    sub.reconnect_delay_set(1, 1)
    sub.on_connect = lambda c, u, flags, rc, p: sessions.append(flags.session_present)
    sub.on_subscribe = lambda c, u, mid, rcs, p: subscribed.set()
    redelivered: list[int] = []

    def on_message(c, u, msg: mqtt.MQTTMessage) -> None:
        t = decode(Telemetry, msg.payload)
        # The broker sends again (with the DUP flag) what it had sent this subscriber
        # when it stopped, unless it had the subscriber's acknowledgement: that is the
        # broker's QoS 1 towards this subscriber, not the agent sending twice (a record
        # the agent published twice would come as a new message, without the flag).
        if msg.dup and any(r.seq == t.seq for r in received):
            redelivered.append(t.seq)
        else:
            received.append(t)

    sub.on_message = on_message
    sub.connect("127.0.0.1", mosquitto.port)
    sub.loop_start()
    bench.closers.append(sub.loop_stop)
    sub.subscribe(topic, qos=1)  # once: after the restart only the kept session can deliver
    assert subscribed.wait(5)

    pushed: list[int] = []  # the seq of every telemetry record the agent queued, in order
    other_metrics: list[str] = []  # other records of telemetry's priority (they share its drop counter)
    peak = [0]
    push_lock = threading.Lock()
    real_push = Spool.push

    def counting_push(spool: Spool, priority: Priority, topic_: str, payload: bytes, *, retain: bool = False):
        with push_lock:
            real_push(spool, priority, topic_, payload, retain=retain)
            if topic_ == topic:
                pushed.append(decode(Telemetry, payload).seq)
            elif priority == Priority.METRICS:
                other_metrics.append(topic_)
            peak[0] = max(peak[0], spool.size_bytes())

    monkeypatch.setattr(Spool, "push", counting_push)  # before the agent starts: every record is seen
    a = bench.agent(telemetry_interval=0.01, spool_max_bytes=bound, reconnect_max_delay=1.0)
    tp, m, w, b = bench.bundle("1.0.0", seed=0)
    bench.deploy("dev1", "d0", tp, m.ref)
    assert bench.wait_for(a, "d0") == "installed"
    time.sleep(0.5)

    with push_lock:
        before = a.spool.counters()
        n_before, other_before = len(pushed), len(other_metrics)
    mosquitto.stop()
    t_end = time.monotonic() + 7.2
    while time.monotonic() < t_end:
        a.infer({"input": X})
        time.sleep(0.002)
    with push_lock:
        offline = pushed[n_before:]
        offline_peak = peak[0]
    mosquitto.start()

    def drained() -> bool:
        """When the spool is empty, every record queued so far is delivered or dropped."""
        nonlocal settled
        with push_lock:
            if len(a.spool) == 0:
                settled = (len(pushed), len(other_metrics), a.spool.counters())
        return settled is not None

    settled = None
    _until(drained, 30, "the spool to drain")
    n, n_other, after = settled  # type: ignore[misc]
    last = pushed[n - 1]
    _until(lambda: any(t.seq > last for t in received), 30,
           "telemetry queued after the spool drained")
    sub.loop_stop()

    seqs = [t.seq for t in received if t.seq <= last]
    counted = set(pushed[:n])
    dropped = after.get("dropped.metrics", 0) - before.get("dropped.metrics", 0)
    missing = sorted(counted - set(seqs))  # seq grows with each record queued
    on_disk = sum(f.stat().st_size for f in a.data_dir.glob("spool.sqlite*"))
    print(f"{len(counted)} telemetry records queued ({len(offline)} offline), {len(seqs)} received "
          f"(and {len(redelivered)} sent again by the broker), "
          f"{dropped} dropped (spool counters {after}); spool peak {peak[0]} B of {bound}, "
          f"spool files {on_disk} B")
    assert sessions == [False, True], "the subscriber's session did not outlive the outage"
    assert len(offline) >= 500, "the agent queued too little telemetry while offline"
    assert offline_peak > bound * 0.9 and peak[0] <= bound  # it filled the spool, and stayed within it
    assert before.get("dropped.metrics", 0) == 0 and len(other_metrics) == other_before == n_other
    assert seqs == sorted(set(seqs)), "out of order or duplicated"
    assert set(seqs) <= counted, "received telemetry the agent never queued"
    assert dropped > 0 and len(pushed[:n]) == len(seqs) + dropped, "records lost or drops miscounted"
    # the oldest are dropped first: what is missing is one run of records queued after
    # the broker went away (until the agent reconnects, a little after it came back)
    first = pushed.index(missing[0])
    assert first >= n_before and missing == pushed[first:first + len(missing)]
    reported = next(t for t in received if t.seq > last)
    assert reported.dropped_records == sum(v for k, v in after.items() if k.startswith("dropped."))


class _Stub:
    """A runtime that doubles its input, and counts unloads."""

    def __init__(self) -> None:
        self.unloads = 0

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"y": inputs["x"] * 2}

    def unload(self) -> None:
        self.unloads += 1


class _Bundle:
    class manifest:  # noqa: N801 - mimics Bundle.manifest
        ref = "stub:1.0.0"


def _stub_model() -> LoadedModel:
    return LoadedModel(_Bundle(), _Stub(), "a")  # type: ignore[arg-type]


def test_observers_run_off_the_request_path_on_copies():
    server = ModelServer()
    server.swap(_stub_model())
    seen: list[tuple[str, np.ndarray, np.ndarray]] = []
    batches: list[int] = []

    def observer(batch: list) -> None:
        batches.append(len(batch))
        seen.extend((threading.current_thread().name, i["x"], o["y"]) for i, o, _ in batch)

    server.observers.append(observer)
    x = np.ones(3, np.float32)
    for k in range(5):
        x[:] = k
        out, _ = server.infer({"x": x})
        out["y"][:] = -1  # the caller reuses its buffers; observers must not see that
    assert server.flush_observers()
    assert [float(i[0]) for _, i, _ in seen] == [0, 1, 2, 3, 4]
    assert [float(o[0]) for _, _, o in seen] == [0, 2, 4, 6, 8]
    assert {name for name, _, _ in seen} == {"observers"}
    assert server.window.peek() == (5, 0) and server.observe_skipped == 0
    assert sum(batches) == 5 and max(batches) <= OBSERVE_CHUNK

    def broken(*_args: object) -> None:
        raise RuntimeError("observer bug")

    server.observers.insert(0, broken)  # a failing observer neither fails requests nor starves others
    server.infer({"x": x})
    assert server.flush_observers() and len(seen) == 6


def test_over_the_rate_limit_observers_see_a_uniform_sample_and_the_rest_is_counted():
    for bad in (-1, float("nan")):
        with pytest.raises(ValueError, match="observe_limit_per_s"):
            ModelServer(observe_limit_per_s=bad)
    server = ModelServer(observe_limit_per_s=50)
    server.swap(_stub_model())
    seen: list[float] = []
    server.observers.append(lambda batch: seen.extend(float(i["x"][0]) for i, _, _ in batch))
    x = np.zeros(1, np.float32)
    served = 0
    t_end = time.perf_counter() + 2.5  # sampled from the first quarter second on
    while time.perf_counter() < t_end:
        x[0] = served
        server.infer({"x": x})
        served += 1
    assert server.flush_observers()
    assert served > 2_000, "the stub runtime should serve thousands of requests a second"
    # every request is either observed, left out by the sample, or skipped because the
    # observers fell behind
    assert len(seen) + server.observe_unsampled + server.observe_skipped == served
    assert server.observe_unsampled > served / 2
    later = [v for v in seen if v >= served / 2.5]
    assert 0 < len(later) <= 50 * 1.5 * 2  # about the limit per second after the first one
    # a uniform sample: what was observed after the first second spreads over those requests
    spread = np.histogram(later, bins=3, range=(served / 2.5, served))[0]
    assert spread.min() > 0

    every = ModelServer()  # no limit: every request is observed
    every.swap(_stub_model())
    count: list[int] = []
    every.observers.append(lambda batch: count.append(len(batch)))
    for _ in range(6):  # in rounds the backlog holds, so that none is skipped either
        for _ in range(500):
            every.infer({"x": x})
        assert every.flush_observers()
    assert sum(count) == 3_000 and every.observe_unsampled == every.observe_skipped == 0


def test_a_request_in_flight_keeps_a_retired_model_loaded():
    server = ModelServer()
    m = _stub_model()
    server.swap(m)
    assert m.acquire()  # a request in flight
    server.swap(_stub_model())  # retires m
    assert m.runtime.unloads == 0 and not m.acquire()  # type: ignore[attr-defined]
    m.release()
    assert m.runtime.unloads == 1 and m.inflight == 0  # type: ignore[attr-defined]
    m.retire()
    assert m.runtime.unloads == 1  # type: ignore[attr-defined]
    out, served = server.infer({"x": np.ones(2, np.float32)})
    assert served is server.active and out["y"].tolist() == [2.0, 2.0]
    with pytest.raises(TypeError):
        server.infer({"x": None})  # type: ignore[dict-item]
    assert server.window.peek() == (2, 1) and server.health.peek() == (2, 1)


def test_a_closed_health_window_counts_nothing_until_the_next_swap():
    server = ModelServer()
    server.swap(_stub_model())
    x = {"x": np.ones(2, np.float32)}
    server.infer(x)
    server.close_health()
    server.infer(x)
    assert server.health.peek() == (1, 0) and server.window.peek() == (2, 0)
    server.swap(_stub_model())  # a new health check begins
    server.infer(x)
    assert server.health.peek() == (1, 0) and server.window.peek() == (3, 0)


class _Failing(_Stub):
    """A runtime whose request fails (or with ``fail=False``, answers) once ``release`` is
    set (a retiring model's last request)."""

    def __init__(self, fail: bool = True) -> None:
        super().__init__()
        self.fail = fail
        self.entered, self.release = threading.Event(), threading.Event()

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.entered.set()
        self.release.wait(5)
        if self.fail:
            raise RuntimeError("the old model failed")
        return super().infer(inputs)


def test_a_request_on_a_swapped_out_model_does_not_count_against_the_new_models_health():
    server = ModelServer()
    old = LoadedModel(_Bundle(), _Failing(), "a")  # type: ignore[arg-type]
    server.swap(old)
    errors: list[BaseException] = []

    def call() -> None:
        try:
            server.infer({"x": np.ones(2, np.float32)})
        except RuntimeError as e:
            errors.append(e)

    t = threading.Thread(target=call)
    t.start()
    assert old.runtime.entered.wait(5)  # type: ignore[attr-defined]
    server.swap(_stub_model())  # the health check of the new model starts now
    old.runtime.release.set()  # type: ignore[attr-defined]
    t.join(5)
    assert len(errors) == 1
    assert server.window.peek() == (1, 1)  # telemetry still counts the failed request
    assert server.health.peek() == (0, 0)  # the new model's health window does not
    server.infer({"x": np.ones(2, np.float32)})
    assert server.health.peek() == (1, 0)


def test_a_request_finishing_on_a_swapped_out_model_counts_when_it_finishes():
    """The buffer of a swapped-out model is kept while a request still runs on it, so a
    window read meanwhile loses nothing, and is dropped once that request is counted."""
    server = ModelServer()
    old = LoadedModel(_Bundle(), _Failing(fail=False), "a")  # type: ignore[arg-type]
    server.swap(old)
    t = threading.Thread(target=server.infer, args=({"x": np.ones(2, np.float32)},))
    t.start()
    assert old.runtime.entered.wait(5)  # type: ignore[attr-defined]
    server.swap(_stub_model())
    assert server.window.peek() == (0, 0) and len(server._retiring) == 1  # still running
    old.runtime.release.set()  # type: ignore[attr-defined]
    t.join(5)
    assert server.window.peek() == (1, 0) and server.health.peek() == (0, 0)
    assert server._retiring == [] and old.runtime.unloads == 1  # type: ignore[attr-defined]


def test_a_window_read_between_swap_and_retire_keeps_the_old_models_buffer():
    """swap() retires the old model after it leaves the lock. A window read in between
    must keep the old buffer: a request that had read the old model may still acquire it
    and count its latency there."""
    server = ModelServer()
    retiring, retire_now = threading.Event(), threading.Event()

    class Old(LoadedModel):
        first = True

        def acquire(self) -> bool:
            if not self.first:
                return super().acquire()
            self.first = False  # this request has read (old model, old buffer)
            swapper = threading.Thread(target=server.swap, args=(new,))
            swapper.start()
            assert retiring.wait(5)  # the swap has left the lock, the old model not yet retired
            server.window.peek()  # a telemetry read or a health poll, just then
            acquired = super().acquire()
            retire_now.set()
            swapper.join(5)
            return acquired

        def retire(self) -> None:
            retiring.set()
            retire_now.wait(5)
            super().retire()

    old = Old(_Bundle(), _Stub(), "a")  # type: ignore[arg-type]
    new = _stub_model()
    server.swap(old)
    _, served = server.infer({"x": np.ones(2, np.float32)})
    assert served is old and server.active is new
    assert server.window.peek() == (1, 0) and server.health.peek() == (0, 0) and server._retiring == []


def test_swapping_in_the_active_model_again_keeps_its_buffer():
    server = ModelServer()
    m = _stub_model()
    server.swap(m)
    server.infer({"x": np.ones(2, np.float32)})
    assert server.swap(m) is m and m.inflight == 0 and m.runtime.unloads == 0  # type: ignore[attr-defined]
    server.infer({"x": np.ones(2, np.float32)})
    assert server._retiring == [] and server.window.peek() == (2, 0) and server.health.peek() == (1, 0)


def test_quantile_matches_numpy_and_does_not_load_numpy_ma():
    import subprocess
    import sys

    from agent.serving import quantile

    rng = np.random.default_rng(3)
    for n in (1, 2, 3, 20, 4096):
        v = np.sort(rng.exponential(1.0, n))
        for q in (0.0, 0.05, 0.5, 0.95, 1.0):
            assert quantile(v, q) == pytest.approx(float(np.quantile(v, q)), rel=1e-12, abs=1e-15)
    probe = ("import sys; from agent.serving import WindowStats; w = WindowStats(); w.record(1.0, True); "
             "w.record(3.0, True); s = w.snapshot_and_reset(); assert s.p50_ms == 2.0, s; "
             "print('numpy.ma' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_latency_reservoir_is_a_uniform_sample_of_the_window():
    """Algorithm L: every successful latency of the window is equally likely to be kept,
    whether it came early or late; failed requests are counted, never kept."""
    random.seed(20261127)
    n, cap, trials = 2000, 50, 400
    per_tenth = np.zeros(10)
    for _ in range(trials):
        w = WindowStats(cap)
        for i in range(n):
            w._add(float(i), True)
            if i % 100 == 0:
                w._add(1e9, False)
        assert len(w._lat) == cap and w.count == n + n // 100 and w.errors == n // 100
        assert max(w._lat) < n
        per_tenth += np.bincount((np.asarray(w._lat) // (n / 10)).astype(int), minlength=10)
    share = per_tenth / per_tenth.sum()
    assert np.all(np.abs(share - 0.1) < 0.01), share  # about 4.5 standard deviations
    small = WindowStats(cap)
    for i in range(cap - 1):
        small._add(float(i), True)
    assert sorted(small._lat) == [float(i) for i in range(cap - 1)]  # under the cap, all kept
    snap = small.snapshot_and_reset()
    assert snap.count == cap - 1 and snap.max_ms == cap - 2 and small.count == 0 and small._lat == []


def test_a_batch_of_latencies_keeps_the_reservoir_one_at_a_time_would():
    """``_add_many`` (the request buffers, taken in) draws the same random numbers in the
    same order as ``_add`` per request, so the reservoir, counts and maximum are equal."""
    rng = np.random.default_rng(7)
    values = rng.exponential(2.0, 3000)
    values[rng.random(3000) < 0.05] = np.nan  # failed requests
    for cap in (1, 64, 5000):
        random.seed(11)
        one = WindowStats(cap)
        for v in values:
            one._add(float(v), not np.isnan(v))
        random.seed(11)
        many = WindowStats(cap)
        cuts = np.sort(rng.choice(np.arange(1, len(values)), 40, replace=False))
        for chunk in np.split(values, cuts):
            many._add_many(chunk)
        many._add_many(np.array([]))
        assert (many.count, many.errors, many._ok, many._max) == (one.count, one.errors, one._ok, one._max)
        assert many._lat == one._lat and len(many._lat) == min(cap, int(np.sum(~np.isnan(values))))
        assert many._next == one._next


def test_latencies_are_counted_once_across_swaps_and_threads():
    """Four request threads, models swapped under them, the windows read meanwhile: every
    request is counted exactly once in the serving window, failures as errors, and the
    buffers of swapped-out models are dropped once their last request has been counted."""
    from agent import serving

    server = ModelServer()
    server.swap(_stub_model())
    good, bad = {"x": np.ones(2, np.float32)}, {"x": None}
    made = [[0, 0] for _ in range(4)]  # per client: requests, failures
    counted = [0, 0]
    done = threading.Event()

    def client(k: int) -> None:
        i = 0
        while not done.is_set():
            i += 1
            made[k][0] += 1
            try:
                server.infer(bad if i % 50 == 0 else good)  # type: ignore[arg-type]
            except TypeError:
                made[k][1] += 1

    def read() -> None:
        snap = server.window.snapshot_and_reset()
        counted[0] += snap.count
        counted[1] += snap.errors

    clients = [threading.Thread(target=client, args=(k,)) for k in range(4)]
    for t in clients:
        t.start()
    for i in range(40):
        server.swap(_stub_model())
        if i % 3 == 0:
            read()
        time.sleep(0.002)
    done.set()
    for t in clients:
        t.join()
    read()
    assert counted == [sum(m[0] for m in made), sum(m[1] for m in made)]
    assert counted[0] > 2 * serving.LATENCY_FOLD and counted[1] > 0
    assert server._retiring == []  # every swapped-out model's buffer was counted and dropped
    assert len(server._serving[1]) == 0


def test_a_full_latency_buffer_is_counted_without_reading_a_window(monkeypatch):
    from agent import serving

    class Slow(_Stub):
        def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            time.sleep(0.002)
            return super().infer(inputs)

    monkeypatch.setattr(serving, "LATENCY_FOLD", 8)
    server = ModelServer()
    server.swap(LoadedModel(_Bundle(), Slow(), "a"))  # type: ignore[arg-type]
    for _ in range(7):
        server.infer({"x": np.ones(2, np.float32)})
    assert server._window.count == 0 and len(server._serving[1]) == 7  # still buffered
    server.infer({"x": np.ones(2, np.float32)})
    assert server._window.count == 8 and server._health.count == 8 and len(server._serving[1]) == 0
    snap = server.health.snapshot_and_reset()
    assert snap.count == 8 and snap.p50_ms is not None and 2.0 <= snap.p50_ms < 1000.0  # milliseconds
    for _ in range(8):  # failed requests fill the buffer too
        with pytest.raises(TypeError):
            server.infer({"x": None})  # type: ignore[dict-item]
    assert server._window.count == 16 and server._window.errors == 8 and len(server._serving[1]) == 0


def test_a_burst_after_a_pause_is_sampled_once_the_limits_share_is_served():
    """After a pause the rate is unknown, so requests are observed whole, but only until a
    quarter second's worth of the limit has been served; then the share comes from their
    rate. A burst is not copied whole for a quarter second (which overflowed the backlog)."""
    server = ModelServer(observe_limit_per_s=40)  # a budget of 10 requests
    server.swap(_stub_model())
    count: list[int] = []
    server.observers.append(lambda batch: count.append(len(batch)))
    x = {"x": np.zeros(1, np.float32)}
    for burst in range(3):
        if burst:
            time.sleep(0.6)  # a pause: more than two rate windows
        before = sum(count)
        t0 = time.perf_counter()
        for _ in range(2000):
            server.infer(x)
        assert server.flush_observers()
        if time.perf_counter() - t0 < 0.2:  # the burst fit in one rate window, as intended
            assert 10 <= sum(count) - before <= 30, count
    assert sum(count) + server.observe_unsampled == 6000 and server.observe_skipped == 0


def test_a_jump_in_the_rate_without_a_pause_is_sampled_at_once():
    """Traffic just under the limit, then a tight loop: the window that was observing
    everything ends once it has observed its budget, so the jump is not copied whole
    until the window's end."""
    server = ModelServer(observe_limit_per_s=40)  # a budget of 10 requests
    server.swap(_stub_model())
    count: list[int] = []
    server.observers.append(lambda batch: count.append(len(batch)))
    x = {"x": np.zeros(1, np.float32)}
    for _ in range(12):  # about 30 a second: under the limit, every one observed
        server.infer(x)
        time.sleep(1 / 30)
    assert server.flush_observers() and sum(count) == 12 and server.observe_unsampled == 0
    t0 = time.perf_counter()
    for _ in range(5000):
        server.infer(x)
    fast = time.perf_counter() - t0 < 0.2  # the jump fit in one rate window, as intended
    assert server.flush_observers()
    if fast:
        assert sum(count) - 12 <= 45, count  # the window's rest, then about twice the budget
    assert sum(count) + server.observe_unsampled == 5012 and server.observe_skipped == 0


def test_observers_run_early_when_half_the_backlog_is_queued(monkeypatch):
    """The observers thread waits for a batch to gather, but not while the backlog fills:
    at half of it, it runs at once, so a burst is not skipped for want of room."""
    from agent import serving

    monkeypatch.setattr(serving, "_OBSERVE_BATCH_S", 30.0)  # only the early wake can start it
    server = ModelServer()
    server.swap(_stub_model())
    count: list[int] = []
    server.observers.append(lambda batch: count.append(len(batch)))
    x = np.zeros(1, np.float32)
    for _ in range(serving._OBSERVE_EARLY + 10):
        server.infer({"x": x})
    deadline = time.monotonic() + 10
    while sum(count) < serving._OBSERVE_EARLY and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sum(count) >= serving._OBSERVE_EARLY
    assert server.observe_skipped == 0
