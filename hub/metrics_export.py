"""``GET /metrics``: the hub's state in the Prometheus text exposition format (0.0.4).

Hand-written (no client library): every value is read from the database or the
running ingest when scraped, so several hub processes behind one database export
consistent fleet figures. Names:

================================================  =======  ==================================
metric                                            type     labels
================================================  =======  ==================================
edgefleet_devices                                 gauge    state (online, offline)
edgefleet_deployment_devices                      gauge    outcome
edgefleet_mqtt_messages_received_total            counter  kind (this process)
edgefleet_mqtt_messages_dropped_total             counter  (this process, queue full)
edgefleet_telemetry_windows                       gauge    (rows retained)
edgefleet_drift_sketches                          gauge    (rows retained)
edgefleet_payload_errors_total                    counter  topic, kind
edgefleet_model_inference_rate                    gauge    model (requests/s, trailing window)
edgefleet_model_error_rate                        gauge    model (errors/s)
edgefleet_model_error_ratio                       gauge    model (errors/requests)
edgefleet_model_latency_ms                        gauge    model, quantile (0.5, 0.95)
edgefleet_alerts_open                             gauge    kind, severity
edgefleet_retrain_episodes_active                 gauge    reason
edgefleet_feedback_rows                           gauge
edgefleet_feedback_rejected_total                 counter  kind (this process)
edgefleet_notifications                           gauge    state (pending, delivered, failed)
edgefleet_monitor_evaluations_total               counter
edgefleet_monitor_last_evaluation_timestamp_seconds gauge
================================================  =======  ==================================
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from sqlalchemy import func
from sqlmodel import Session, col, select

from hub.models import DeploymentDevice, Device, DriftSketchRow, PayloadErrorCount, Telemetry
from hub.models_monitoring import Alert, Feedback, RetrainEpisode, WebhookDelivery
from hub.monitoring import operations_report

__all__ = ["CONTENT_TYPE", "ProcessCounters", "render_metrics"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass
class ProcessCounters:
    """Counters held by this hub process (they restart at zero with it)."""

    mqtt_received: Mapping[str, int] = field(default_factory=dict)
    mqtt_dropped: int = 0
    feedback_rejected: Mapping[str, int] = field(default_factory=dict)
    evaluations: int = 0
    last_evaluation: float | None = None


def _esc(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _num(v: float) -> str:
    f = float(v)
    if math.isnan(f):
        return "NaN"
    if math.isinf(f):
        return "+Inf" if f > 0 else "-Inf"
    return str(int(f)) if f.is_integer() and abs(f) < 2**53 else repr(f)


class _Writer:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_: str,
               samples: Iterable[tuple[Mapping[str, str], float]]) -> None:
        self.lines.append(f"# HELP {name} {help_}")
        self.lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            lab = ",".join(f'{k}="{_esc(str(v))}"' for k, v in labels.items())
            self.lines.append(f"{name}{{{lab}}} {_num(value)}" if lab else f"{name} {_num(value)}")

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def render_metrics(session: Session, counters: ProcessCounters, *, now: float, ops_window_s: float) -> str:
    """The exposition text. Per-model rates cover telemetry windows ending in the last
    ``ops_window_s`` seconds."""
    w = _Writer()
    online = dict(session.exec(select(Device.online, func.count()).group_by(col(Device.online))).all())
    w.family("edgefleet_devices", "gauge", "Devices known to the hub, by presence.",
             [({"state": "online"}, online.get(True, 0)), ({"state": "offline"}, online.get(False, 0))])
    outcomes = session.exec(
        select(DeploymentDevice.outcome, func.count()).group_by(col(DeploymentDevice.outcome))
    ).all()
    w.family("edgefleet_deployment_devices", "gauge", "Device deployments, by outcome.",
             [({"outcome": o}, n) for o, n in sorted(outcomes)])
    w.family("edgefleet_mqtt_messages_received_total", "counter",
             "MQTT messages received by this hub process, by topic kind.",
             [({"kind": k}, n) for k, n in sorted(counters.mqtt_received.items())])
    w.family("edgefleet_mqtt_messages_dropped_total", "counter",
             "MQTT messages dropped by this hub process because the ingest queue was full.",
             [({}, counters.mqtt_dropped)])
    w.family("edgefleet_telemetry_windows", "gauge", "Telemetry windows retained in the database.",
             [({}, session.exec(select(func.count()).select_from(Telemetry)).one())])
    w.family("edgefleet_drift_sketches", "gauge", "Drift sketches retained in the database.",
             [({}, session.exec(select(func.count()).select_from(DriftSketchRow)).one())])
    errs = session.exec(select(PayloadErrorCount)).all()
    w.family("edgefleet_payload_errors_total", "counter", "Malformed inbound payloads, by topic and kind.",
             [({"topic": e.topic_kind, "kind": e.kind}, e.count)
              for e in sorted(errs, key=lambda e: (e.topic_kind, e.kind))])
    ops = operations_report(session, now=now, window_s=ops_window_s)
    rate, err_rate, ratio, lat = [], [], [], []
    for m in ops.models:
        lab = {"model": m.key}
        if m.throughput_rps is not None:
            rate.append((lab, m.throughput_rps))
            if m.requests:
                err_rate.append((lab, m.throughput_rps * m.errors / m.requests))
        if m.error_rate is not None:
            ratio.append((lab, m.error_rate))
        for q, v in (("0.5", m.p50_ms), ("0.95", m.p95_ms)):
            if v is not None:
                lat.append(({"model": m.key, "quantile": q}, v))
    w.family("edgefleet_model_inference_rate", "gauge",
             f"Inferences per second over the last {ops_window_s:.0f} s, summed over devices.", rate)
    w.family("edgefleet_model_error_rate", "gauge", "Inference errors per second.", err_rate)
    w.family("edgefleet_model_error_ratio", "gauge", "Inference errors per request.", ratio)
    w.family("edgefleet_model_latency_ms", "gauge", "Inference latency quantiles, milliseconds.", lat)
    alerts = session.exec(
        select(Alert.kind, Alert.severity, func.count()).where(Alert.state == "open")
        .group_by(col(Alert.kind), col(Alert.severity))
    ).all()
    w.family("edgefleet_alerts_open", "gauge", "Open monitoring alerts.",
             [({"kind": k, "severity": s}, n) for k, s, n in sorted(alerts)])
    eps = session.exec(
        select(RetrainEpisode.reason, func.count()).where(RetrainEpisode.state == "active")
        .group_by(col(RetrainEpisode.reason))
    ).all()
    w.family("edgefleet_retrain_episodes_active", "gauge", "Active retraining episodes.",
             [({"reason": r}, n) for r, n in sorted(eps)])
    w.family("edgefleet_feedback_rows", "gauge", "Labelled feedback rows stored.",
             [({}, session.exec(select(func.count()).select_from(Feedback)).one())])
    w.family("edgefleet_feedback_rejected_total", "counter",
             "Feedback batches rejected by this hub process, by kind.",
             [({"kind": k}, n) for k, n in sorted(counters.feedback_rejected.items())])
    dl = dict(session.exec(
        select(WebhookDelivery.state, func.count()).group_by(col(WebhookDelivery.state))
    ).all())
    w.family("edgefleet_notifications", "gauge", "Webhook and command notifications, by state.",
             [({"state": st}, dl.get(st, 0)) for st in ("pending", "delivered", "failed")])
    w.family("edgefleet_monitor_evaluations_total", "counter",
             "Alert rule evaluations run by this hub process.", [({}, counters.evaluations)])
    if counters.last_evaluation is not None:
        w.family("edgefleet_monitor_last_evaluation_timestamp_seconds", "gauge",
                 "When alert rules were last evaluated.", [({}, counters.last_evaluation)])
    return w.text()
