"""The agent's metrics in the Prometheus text format, for ``GET /metrics`` on the local API.

A Prometheus server, or an agent that scrapes for one (Grafana Alloy, the OpenTelemetry
collector, Prometheus in agent mode), reads the device's serving figures from the same
localhost endpoint as applications: requests served since start by outcome, a histogram
of their latencies (buckets :data:`agent.serving.LATENCY_BUCKETS_S`), the active model
and candidate, the lifecycle state, the broker link, the telemetry spool and the
process' own CPU, memory and file descriptors. Counters never reset while the agent
runs, so the scraper takes rates; the telemetry sent to the hub keeps its own windows.

``prometheus_client`` writes the format. This module is imported at the first scrape,
so an agent that nobody scrapes does not load it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder

import agent
from agent.serving import LATENCY_BUCKETS_S, ModelServer

__all__ = ["AgentGauges", "MetricsEndpoint"]


@dataclass(frozen=True)
class AgentGauges:
    """What the daemon adds to the serving figures, read at each scrape."""

    device_id: str
    state: str  # lifecycle state (agent.lifecycle.State)
    states: tuple[str, ...]  # every state, so that each has a series (0 or 1)
    connected: bool
    spool_records: int
    spool_bytes: int
    spool_limit_bytes: int
    spool_dropped: int
    conditions: tuple[str, ...] = field(default=())


class _Collector:
    def __init__(self, server: ModelServer, gauges: Callable[[], AgentGauges] | None):
        self._server = server
        self._gauges = gauges

    def collect(self) -> Iterator[Metric]:
        server = self._server
        info = GaugeMetricFamily("edgefleet_agent_info", "The agent's version (and device id), always 1.",
                                 labels=["version", "device_id"])
        g = self._gauges() if self._gauges is not None else None
        info.add_metric([agent.__version__, g.device_id if g else ""], 1)
        yield info

        m = server.active
        ready = GaugeMetricFamily("edgefleet_agent_model_ready", "1 when a model is active and serving.")
        ready.add_metric([], 1 if m is not None else 0)
        yield ready
        model = GaugeMetricFamily("edgefleet_agent_model_info", "The active model, always 1 (absent when none).",
                                  labels=["model", "version", "slot", "runtime", "format"])
        if m is not None:
            man = m.bundle.manifest
            model.add_metric([man.name, man.version, m.slot, man.runtime, man.format], 1)
        yield model
        cand = server.candidate
        cinfo = GaugeMetricFamily("edgefleet_agent_candidate_ratio",
                                  "Share of requests a shadow or split candidate sees (absent when none).",
                                  labels=["model", "version", "mode"])
        if cand is not None:
            man = cand.model.bundle.manifest
            cinfo.add_metric([man.name, man.version, cand.mode], cand.ratio)
        yield cinfo

        t = server.totals()
        req = CounterMetricFamily("edgefleet_agent_inference_requests",
                                  "Inference requests since start, by outcome (failure: the runtime raised).",
                                  labels=["outcome"])
        req.add_metric(["success"], t.requests - t.errors)
        req.add_metric(["failure"], t.errors)
        yield req
        cumulative, buckets = 0, []
        for bound, n in zip((*(repr(b) for b in LATENCY_BUCKETS_S), "+Inf"), t.buckets, strict=True):
            cumulative += n
            buckets.append((bound, cumulative))
        yield HistogramMetricFamily("edgefleet_agent_inference_duration_seconds",
                                    "Latency of the successful inference requests since start (runtime call).",
                                    buckets=buckets, sum_value=t.sum_s)
        answered = CounterMetricFamily("edgefleet_agent_previous_model_answers",
                                       "Requests a newly activated model failed, answered by the model it "
                                       "replaced (counted as failures above).")
        answered.add_metric([], server.previous_served)
        yield answered
        unsampled = CounterMetricFamily("edgefleet_agent_drift_unsampled_requests",
                                        "Requests left out of the drift sketch's sample (over the rate limit).")
        unsampled.add_metric([], server.observe_unsampled)
        yield unsampled
        skipped = CounterMetricFamily("edgefleet_agent_drift_skipped_requests",
                                      "Requests not sketched because the observers fell behind.")
        skipped.add_metric([], server.observe_skipped)
        yield skipped

        if g is None:
            return
        state = GaugeMetricFamily("edgefleet_agent_lifecycle_state",
                                  "The update lifecycle's state: 1 for the current one, 0 for the others.",
                                  labels=["state"])
        for s in g.states:
            state.add_metric([s], 1 if s == g.state else 0)
        yield state
        conn = GaugeMetricFamily("edgefleet_agent_broker_connected", "1 while the MQTT link to the hub is up.")
        conn.add_metric([], 1 if g.connected else 0)
        yield conn
        cond = GaugeMetricFamily("edgefleet_agent_condition",
                                 "Conditions the agent reports to the hub (e.g. metadata_expired), 1 while they hold.",
                                 labels=["condition"])
        for c in g.conditions:
            cond.add_metric([c], 1)
        yield cond
        for name, doc, value in (
            ("edgefleet_agent_spool_records", "Telemetry records waiting in the spool.", g.spool_records),
            ("edgefleet_agent_spool_bytes", "Bytes the spool's records take.", g.spool_bytes),
            ("edgefleet_agent_spool_limit_bytes", "The spool's bound in bytes.", g.spool_limit_bytes),
        ):
            fam = GaugeMetricFamily(name, doc)
            fam.add_metric([], value)
            yield fam
        dropped = CounterMetricFamily("edgefleet_agent_spool_dropped_records",
                                      "Records the spool dropped to stay within its bound.")
        dropped.add_metric([], g.spool_dropped)
        yield dropped


class MetricsEndpoint:
    """Renders the metrics of ``server`` (and of the daemon, when ``gauges`` is given)."""

    def __init__(self, server: ModelServer, gauges: Callable[[], AgentGauges] | None = None):
        self._registry = CollectorRegistry(auto_describe=False)
        self._registry.register(_Collector(server, gauges))  # type: ignore[arg-type]
        self._registry.register(ProcessCollector(registry=None))

    def render(self, accept: str = "") -> tuple[bytes, str]:
        """The metrics and their content type, in the format the ``Accept`` header asks
        for: OpenMetrics or the Prometheus text format (version 0.0.4 unless asked)."""
        encode, content_type = choose_encoder(accept)
        return encode(self._registry), content_type
