"""GET /metrics: the Prometheus endpoint of the local API, and the totals behind it."""

from __future__ import annotations

import http.client
import math
import threading

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent.localapi import InferenceClient, LocalApi
from agent.runtimes.base import LoadedModel
from agent.serving import LATENCY_BUCKETS_S, ModelServer, Totals
from tests.support import free_port


class _Double:
    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if "x" not in inputs:
            raise ValueError("missing input x")
        return {"y": inputs["x"] * 2}

    def unload(self) -> None:
        pass


class _Bundle:
    class manifest:  # noqa: N801 - mimics Bundle.manifest
        ref = "stub:1.0.0"
        name, version, runtime, format = "stub", "1.0.0", "onnxruntime", "onnx"


def _stub() -> LoadedModel:
    return LoadedModel(_Bundle(), _Double(), "a")  # type: ignore[arg-type]


def _get(port: int, path: str, method: str = "GET", accept: str | None = None) -> tuple[int, str, bytes]:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    c.request(method, path, headers={"Accept": accept} if accept else {})
    r = c.getresponse()
    body = r.read()
    c.close()
    return r.status, r.getheader("Content-Type") or "", body


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_totals_count_failures_and_bucket_latencies_as_le_reads():
    t = Totals()
    # ms: exactly on the 1 ms bound (le="0.001" holds it), just over it, a failure, and
    # one beyond the last bound.
    t._add_many(np.array([1.0, 1.0000001, math.nan, 60_000.0, 0.01]))
    snap = t.snapshot()
    assert (snap.requests, snap.errors) == (5, 1)
    i1 = LATENCY_BUCKETS_S.index(0.001)
    assert snap.buckets[0] == 1  # 0.01 ms <= 50 µs
    assert snap.buckets[i1] == 1 and snap.buckets[i1 + 1] == 1
    assert snap.buckets[-1] == 1 and sum(snap.buckets) == 4
    assert snap.sum_s == pytest.approx((1.0 + 1.0000001 + 60_000.0 + 0.01) / 1000)
    t._add(5.0, False)
    assert t.snapshot().errors == 2 and sum(t.snapshot().buckets) == 4


def test_server_totals_take_in_unfolded_requests_split_ones_and_not_shadow_ones():
    server = ModelServer()
    server.swap(_stub())
    x = {"x": np.ones((1, 2), np.float32)}
    for _ in range(7):
        server.infer(x)
    with pytest.raises(ValueError):
        server.infer({})
    t = server.totals()  # the buffer holds them until read
    assert (t.requests, t.errors, sum(t.buckets)) == (8, 1, 7)
    # A request in flight across a swap finishes on the old model and counts.
    gate, started = threading.Event(), threading.Event()

    class _Held(_Double):
        def infer(self, inputs):
            started.set()
            gate.wait(5)
            return super().infer(inputs)

    server.swap(LoadedModel(_Bundle(), _Held(), "b"))  # type: ignore[arg-type]
    held = threading.Thread(target=server.infer, args=(x,))
    held.start()
    assert started.wait(5)
    server.swap(_stub())
    gate.set()
    held.join(5)
    assert server.totals().requests == 9
    server.set_candidate(_stub(), mode="split", ratio=1.0)
    for _ in range(3):
        server.infer(x)
    assert server.totals().requests == 12
    server.set_candidate(_stub(), mode="shadow", ratio=1.0)
    server.infer(x)
    assert server.totals().requests == 13  # the shadow copy is not a served request


def test_metrics_route_is_built_at_the_first_scrape_and_refuses_other_methods():
    server = ModelServer()
    server.swap(_stub())
    built = []

    def make():
        from agent.metrics import MetricsEndpoint

        built.append(1)
        return MetricsEndpoint(server)

    port = free_port()
    api = LocalApi(server, port, metrics=make)
    api.start()
    try:
        assert _get(port, "/v2/health/ready")[0] == 200 and not built
        status, ctype, body = _get(port, "/metrics?x=1")
        assert status == 200 and ctype.startswith("text/plain; version=0.0.4") and built == [1]
        s = _samples(body.decode())
        assert s[("edgefleet_agent_model_info", (("format", "onnx"), ("model", "stub"), ("runtime", "onnxruntime"),
                                                 ("slot", "a"), ("version", "1.0.0")))] == 1
        assert s[("edgefleet_agent_model_ready", ())] == 1
        assert ("edgefleet_agent_lifecycle_state", (("state", "idle"),)) not in s  # no daemon here
        # What a Prometheus server asks for first: OpenMetrics.
        status, ctype, body = _get(port, "/metrics", accept="application/openmetrics-text;version=1.0.0,"
                                   "text/plain;version=0.0.4;q=0.5")
        assert status == 200 and ctype.startswith("application/openmetrics-text") and body.endswith(b"# EOF\n")
        assert built == [1]
        status, _, body = _get(port, "/metrics", "HEAD")
        assert status == 200 and body == b""
        assert _get(port, "/metrics", "POST")[0] == 404
    finally:
        api.stop()


def test_metrics_route_says_what_is_missing_when_the_library_is_not_installed():
    def make():
        raise ImportError("No module named 'prometheus_client'")

    port = free_port()
    api = LocalApi(ModelServer(), port, metrics=make)
    api.start()
    try:
        status, _, body = _get(port, "/metrics")
        assert status == 501 and b"prometheus-client" in body
        assert _get(port, "/v2/health/live")[0] == 200  # the rest of the API serves on
    finally:
        api.stop()


def test_a_running_agent_reports_requests_latencies_state_link_and_spool(bench):
    port = free_port()
    a = bench.agent(api_port=port)
    tp, m, _w, _b = bench.bundle("1.0.0", seed=1)
    bench.deploy("dev1", "d1", tp, m.ref)
    assert bench.wait_for(a, "d1") == "installed"
    client = InferenceClient(f"http://127.0.0.1:{port}")
    before = a.server.totals()
    for _ in range(5):
        client.infer("lin", {"input": np.ones((2, 4), np.float32)})
    with pytest.raises(ValueError):
        a.infer({})  # the runtime refuses it: a failed request
    status, ctype, body = _get(port, "/metrics")
    assert status == 200 and ctype.startswith("text/plain")
    s = _samples(body.decode())
    ok = s[("edgefleet_agent_inference_requests_total", (("outcome", "success"),))]
    failed = s[("edgefleet_agent_inference_requests_total", (("outcome", "failure"),))]
    assert ok == before.requests - before.errors + 5 and failed == before.errors + 1
    assert s[("edgefleet_agent_inference_duration_seconds_count", ())] == ok
    cumulative = [s[("edgefleet_agent_inference_duration_seconds_bucket", (("le", le),))]
                  for le in (*(repr(b) for b in LATENCY_BUCKETS_S), "+Inf")]
    assert cumulative == sorted(cumulative) and cumulative[-1] == ok
    assert 0 < s[("edgefleet_agent_inference_duration_seconds_sum", ())] < ok
    assert s[("edgefleet_agent_lifecycle_state", (("state", "committed"),))] == 1
    assert sum(v for (n, _l), v in s.items() if n == "edgefleet_agent_lifecycle_state") == 1
    assert s[("edgefleet_agent_broker_connected", ())] == 1
    assert s[("edgefleet_agent_info", (("device_id", "dev1"), ("version", __import__("agent").__version__)))] == 1
    assert s[("edgefleet_agent_model_info", (("format", m.format), ("model", "lin"), ("runtime", m.runtime),
                                             ("slot", a.server.active.slot), ("version", "1.0.0")))] == 1
    assert s[("edgefleet_agent_spool_limit_bytes", ())] == a.spool.max_bytes
    assert s[("edgefleet_agent_spool_records", ())] >= 0 and ("edgefleet_agent_spool_dropped_records_total", ()) in s
    assert s[("process_resident_memory_bytes", ())] > 10 << 20
